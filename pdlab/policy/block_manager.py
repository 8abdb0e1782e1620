"""Paged KV accounting: which block belongs to which request (standard library only).

A block holds `block_size` consecutive token positions of one request, in every
layer. Blocks are plain integers indexing the KV cache tensors; this class
only decides who owns them. Invariant (checked by `check_invariants`): every
block is either free or owned by exactly one request.
"""

from __future__ import annotations

from collections import deque

from pdlab.policy.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be > 0")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._owner: dict[int, str] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing_blocks(self, request: Request, num_tokens: int) -> int:
        """Blocks `request` lacks to hold `num_tokens` token positions in total."""
        return max(0, self.num_blocks_for(num_tokens) - len(request.block_ids))

    def can_allocate(self, request: Request, num_tokens: int) -> bool:
        return self.num_missing_blocks(request, num_tokens) <= len(self._free)

    def allocate(self, request: Request, num_tokens: int) -> list[int]:
        """Grow `request.block_ids` to cover `num_tokens` positions; return the new blocks.

        The caller checks `can_allocate` first; allocating past the free pool
        raises and changes nothing.
        """
        missing = self.num_missing_blocks(request, num_tokens)
        if missing > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {missing}, {len(self._free)} free")
        new = [self._free.popleft() for _ in range(missing)]
        for block in new:
            self._owner[block] = request.request_id
        request.block_ids.extend(new)
        return new

    def free(self, request: Request) -> None:
        """Return all of `request`'s blocks to the pool (idempotent)."""
        for block in request.block_ids:
            if self._owner.pop(block, None) != request.request_id:
                raise RuntimeError(f"block {block} freed by {request.request_id}, which does not own it")
            self._free.append(block)
        request.block_ids = []

    def owner(self, block: int) -> str | None:
        return self._owner.get(block)

    def check_invariants(self, requests: list[Request] | None = None) -> None:
        """Raise AssertionError unless every block is free xor owned (by `requests`, when given)."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        owned = set(self._owner)
        assert not free & owned, f"blocks both free and owned: {sorted(free & owned)[:8]}"
        assert free | owned == set(range(self.num_blocks)), "a block is neither free nor owned"
        if requests is not None:
            held = {}
            for request in requests:
                for block in request.block_ids:
                    assert block not in held, f"block {block} held by {held[block]} and {request.request_id}"
                    held[block] = request.request_id
            assert held == self._owner, "the owner table disagrees with the requests' block lists"
