"""What the KV transports exchange with the control plane: where a decode instance's cache is
(`KVDescriptor`, one `KVRank` per tensor-parallel rank) and the header of one layer's blocks sent over tcp
(`KVLayer`). msgspec structs, msgpack on the wire (never pickle); `pdlab.cluster.messages` carries them
among its messages (a `PrefillTask` holds a `KVDescriptor`; `KVLayer` arrives on the cache-queue port).
"""

from __future__ import annotations

import msgspec


class KVRank(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where one tensor-parallel rank's cache is (the per-rank fields of `KVDescriptor`)."""

    ipc_handle: bytes = b""
    ipc_offset: int = 0
    ipc_pid: int = 0
    ipc_ptr: int = 0
    ipc_device: int = 0
    shm_name: str = ""
    rdma_endpoint: str = ""


class KVDescriptor(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where and how a decode instance receives KV: enough for a prefill instance to push to it.

    The cache fields describe rank 0's cache (of a tensor-parallel instance: its KV heads);
    `ranks` holds every rank's own, and prefill rank r writes into decode rank r (`for_rank`).
    """

    instance_id: str
    protocol: str  # "tcp", "ipc", "rdma"
    cache_endpoint: str  # zmq address of the decode instance's cache-queue port
    # The decode cache's layout; the prefill side checks it matches its own.
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    # ipc on GPUs: a CUDA IPC handle (64 bytes) of the allocation holding the cache, the
    # cache's byte offset in it, and the exporter's pid and raw pointer (usable as is
    # by a sender in the same process, where IPC handles cannot be opened).
    ipc_handle: bytes = b""
    ipc_offset: int = 0
    ipc_pid: int = 0
    ipc_ptr: int = 0
    ipc_device: int = 0
    # ipc on CPUs: the shared-memory file that holds the cache.
    shm_name: str = ""
    host: str = ""
    # rdma: "host:port" of the decode instance's rdma comm port (one per GPU), where a prefill
    # sets up its queue pair and learns the cache's memory region (pdlab/transfer/rdma_sender.py).
    rdma_endpoint: str = ""
    # Tensor parallelism: the decode instance's size, and each rank's cache (empty: one rank).
    tensor_parallel_size: int = 1
    ranks: list[KVRank] = []

    def for_rank(self, rank: int) -> KVDescriptor:
        """The descriptor of rank `rank`'s cache."""
        if not self.ranks:
            return self
        return msgspec.structs.replace(self, **msgspec.structs.asdict(self.ranks[rank]), ranks=[])


class KVLayer(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """Header of one layer's blocks (tcp); the next frame holds [2, n, block_size, heads, head_dim] raw."""

    request_id: str
    layer: int
    dst_block_ids: list[int]
    dtype: str
    shape: tuple[int, ...]


def encode_layer(header: KVLayer) -> bytes:
    """A `KVLayer` as `pdlab.cluster.messages.decode` reads it (a tagged struct: msgpack with its type's name)."""
    return msgspec.msgpack.encode(header)
