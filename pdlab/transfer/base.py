"""The contract every KV transport keeps."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from pdlab.models.kv_cache import KVCache
from pdlab.transfer.descriptor import KVDescriptor, KVLayer


class TransferError(RuntimeError):
    """A transfer cannot be made (layouts differ, a block id is out of range, the peer is unreachable)."""


def check_compatible(local: KVCache, dst: KVDescriptor) -> None:
    """Raise TransferError unless the destination cache has the local cache's layout."""
    shape = local.kv.shape  # [L, 2, N, bs, H, D]
    mine = (shape[0], shape[3], shape[4], shape[5], str(local.kv.dtype).removeprefix("torch."))
    theirs = (dst.num_layers, dst.block_size, dst.num_kv_heads, dst.head_dim, dst.dtype)
    if mine != theirs:
        names = "layers, block_size, kv heads, head_dim, dtype"
        raise TransferError(f"KV layouts differ ({names}): prefill {mine}, decode {theirs} at {dst.instance_id}")


class KVSender(ABC):
    """Prefill side: writes a prefill instance's blocks into one decode instance's blocks.

    One sender per destination decode instance, owned by the prefill's single
    engine thread. Calls come in this order for each request: `send_layer` for
    layer 0, 1, ..., L-1 of each computed chunk (inside the forward pass, right
    after that layer's K and V are in the local cache), then `flush`, then the
    caller sends `PrefillDone` on `socket`. The local blocks must stay allocated
    until the decode side's `KVAck` arrives. `send_layer` must not wait on the
    network; `flush` returns once everything queued so far has been written into
    the destination cache (ipc) or handed, in order, to `socket`, which carries
    `PrefillDone` after it (tcp). Errors raise TransferError.
    """

    def __init__(self, local: KVCache, dst: KVDescriptor, socket) -> None:
        check_compatible(local, dst)
        self.local = local
        self.dst = dst
        self.socket = socket  # zmq DEALER connected to dst.cache_endpoint

    def check_blocks(self, block_ids: list[int], num_blocks: int, side: str) -> None:
        if block_ids and not (0 <= min(block_ids) and max(block_ids) < num_blocks):
            raise TransferError(f"{side} block id out of range [0, {num_blocks}): {block_ids}")

    def check_mapping(self, src_block_ids: list[int], dst_block_ids: list[int]) -> None:
        """Raise TransferError unless source block i goes to destination block i, every id in range."""
        if len(src_block_ids) != len(dst_block_ids):
            raise TransferError(f"{len(src_block_ids)} source blocks for {len(dst_block_ids)} destination blocks")
        self.check_blocks(src_block_ids, self.local.num_blocks, "source")
        self.check_blocks(dst_block_ids, self.dst.num_blocks, "destination")

    @abstractmethod
    def send_layer(self, request_id: str, layer: int, src_block_ids: list[int], dst_block_ids: list[int]) -> None:
        """Queue the copy of `layer`'s K and V from local `src_block_ids` to remote `dst_block_ids` (block i to
        block i); lists of different lengths or an id out of range raise TransferError and send nothing."""

    def send_layers(self, request_id: str, layers: range, src_block_ids: list[int], dst_block_ids: list[int]) -> None:
        """`send_layer` for several layers at once (a whole request after its forward pass)."""
        for layer in layers:
            self.send_layer(request_id, layer, src_block_ids, dst_block_ids)

    def flush(self) -> None:
        """Wait until every queued layer is written into the destination, or handed to `socket`."""

    def abort(self, request_id: str) -> None:
        """Stop caring about `request_id`: drop what is queued for it and not yet started."""

    def close(self) -> None:
        """Release mappings of the destination's memory."""


class KVReceiver(ABC):
    """Decode side: exposes the local cache to prefill instances.

    `descriptor_fields` go into the `KVDescriptor` that travels with every
    prefill task. For tcp, the decode instance's cache-queue loop hands every
    `KVLayer` frame to `write_layer`; ipc transports write directly and never
    call it.
    """

    def __init__(self, local: KVCache) -> None:
        self.local = local

    def descriptor_fields(self) -> dict:
        return {}

    def write_layer(self, header: KVLayer, payload: memoryview) -> None:
        raise TransferError(f"{type(self).__name__} does not receive KV over the control socket")

    def commit(self, block_ids: list[int]) -> None:
        """A request's KV has landed (its `PrefillDone` came): make `block_ids` readable by the engine.
        Called before the request runs; a no-op for transports that write the cache itself."""

    def close(self) -> None:
        pass


def gather_blocks(kv: torch.Tensor, layer: int, block_ids: list[int]) -> torch.Tensor:
    """K and V of `layer` for `block_ids`: [2, n, block_size, H_kv, D], contiguous."""
    index = torch.tensor(block_ids, dtype=torch.int64, device=kv.device)
    return kv[layer].index_select(1, index)
