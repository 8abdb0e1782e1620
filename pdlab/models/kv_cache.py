"""The paged KV cache tensors.

Layout: one allocation `kv` of shape [num_layers, 2, num_blocks, block_size,
num_kv_heads, head_dim]; `kv[l, 0]` holds layer l's keys and `kv[l, 1]` its
values. Token position p of a request lives in block `block_ids[p //
block_size]` at offset `p % block_size`; its flat slot is `block * block_size
+ offset`. One allocation means one handle to export for KV transfer, and a
request's blocks of one layer are `kv[l, :, block_ids]`.
"""

from __future__ import annotations

import torch

from pdlab.models.config import ModelConfig


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        shm_path: str | None = None,
        scratch_block: bool = False,
    ) -> None:
        """`shm_path` (CPU only): back the cache by that shared-memory file, so that another
        process can map it (the `ipc` transport on a machine without GPUs).
        `scratch_block`: one block more than `num_blocks`, that no request ever owns; writes
        that must land somewhere harmless go there (the padding rows of a CUDA graph)."""
        self.num_blocks = num_blocks  # the blocks requests may own (what the block manager hands out)
        self.block_size = block_size
        self.shm_path = shm_path
        self.scratch_slot = num_blocks * block_size if scratch_block else None
        shape = (config.num_layers, 2, num_blocks + scratch_block, block_size, config.num_kv_heads, config.head_dim)
        if shm_path is None:
            self.kv = torch.zeros(shape, dtype=dtype, device=device)  # [L, 2, num_blocks (+ scratch), block_size, H_kv, D]
        else:
            if torch.device(device).type != "cpu":
                raise ValueError("a shared-memory KV cache is for CPU instances; GPUs share theirs through CUDA IPC")
            self.kv = torch.from_file(shm_path, shared=True, size=torch.Size(shape).numel(), dtype=dtype).view(shape)
            self.kv.zero_()

    def close(self) -> None:
        """Remove the shared-memory file, if any (mappings stay valid until dropped)."""
        if self.shm_path is not None:
            import os

            try:
                os.unlink(self.shm_path)
            except FileNotFoundError:
                pass

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of one layer, each [num_blocks, block_size, H_kv, D]."""
        return self.kv[layer_idx, 0], self.kv[layer_idx, 1]

    @property
    def num_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return config.kv_bytes_per_token(torch.tensor([], dtype=dtype).element_size()) * block_size

    @classmethod
    def num_blocks_for_budget(cls, config: ModelConfig, block_size: int, dtype: torch.dtype, budget_bytes: int) -> int:
        return budget_bytes // cls.bytes_per_block(config, block_size, dtype)
