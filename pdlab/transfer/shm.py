"""`ipc` on a machine without GPUs: the decode cache lives in shared memory and the prefill writes into it."""

from __future__ import annotations

from pathlib import Path

import torch

from pdlab.models.kv_cache import KVCache
from pdlab.models.load import DTYPES
from pdlab.transfer.base import KVReceiver, KVSender, TransferError
from pdlab.transfer.descriptor import KVDescriptor

SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "pdlab-kv-"


def shm_path(name: str) -> str:
    """Where a decode instance keeps its shared-memory KV cache."""
    return str(SHM_DIR / f"{SHM_PREFIX}{name}")


class ShmSender(KVSender):
    def __init__(self, local: KVCache, dst: KVDescriptor, socket) -> None:
        super().__init__(local, dst, socket)
        if not dst.shm_name:
            raise TransferError(f"decode instance {dst.instance_id} offers no shared-memory KV cache for ipc")
        shape = (dst.num_layers, 2, dst.num_blocks, dst.block_size, dst.num_kv_heads, dst.head_dim)
        # Map only an existing pdlab cache of exactly the described size: from_file would
        # otherwise create or grow whatever file a message names.
        path = Path(dst.shm_name)
        expected = torch.Size(shape).numel() * local.kv.element_size()
        if path.parent != SHM_DIR or not path.name.startswith(SHM_PREFIX) or not path.is_file():
            raise TransferError(f"{dst.shm_name!r} is not a pdlab KV cache in {SHM_DIR}")
        if path.stat().st_size != expected:
            raise TransferError(f"{dst.shm_name} holds {path.stat().st_size} bytes; the descriptor says {expected}")
        try:
            self.remote = torch.from_file(dst.shm_name, shared=True, size=torch.Size(shape).numel(),
                                          dtype=DTYPES[dst.dtype]).view(shape)
        except (RuntimeError, OSError) as e:
            raise TransferError(f"cannot map decode instance {dst.instance_id}'s KV cache {dst.shm_name}: {e}") from None

    def send_layer(self, request_id: str, layer: int, src_block_ids: list[int], dst_block_ids: list[int]) -> None:
        self.check_mapping(src_block_ids, dst_block_ids)
        src = torch.tensor(src_block_ids, dtype=torch.int64)
        dst = torch.tensor(dst_block_ids, dtype=torch.int64)
        self.remote[layer].index_copy_(1, dst, self.local.kv[layer].index_select(1, src))

    def close(self) -> None:
        self.remote = None


class ShmReceiver(KVReceiver):
    def __init__(self, local: KVCache) -> None:
        super().__init__(local)
        if local.shm_path is None:
            raise TransferError("ipc on CPU needs the decode KV cache in shared memory (KVCache(shm_path=...))")

    def descriptor_fields(self) -> dict:
        return {"shm_name": self.local.shm_path}
