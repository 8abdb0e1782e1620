"""KV transports: move a request's KV blocks from a prefill instance's cache into a decode instance's.

`make_sender(protocol, ...)` and `make_receiver(protocol, ...)` pick one by
name; the modules are imported only when used (pyverbs, for `rdma`, is optional).

| protocol | device | how |
|---|---|---|
| `tcp`  | any  | host-staged: each layer's blocks are gathered, sent as one zmq frame, scattered on the decode side |
| `ipc`  | CPU  | the decode instance's KV cache lives in shared memory; the prefill instance writes into it |
| `ipc`  | CUDA | CUDA IPC handle of the decode cache; one kernel on the prefill GPU writes the blocks through peer access |
| `rdma` | any  | one-sided RDMA WRITEs into the decode cache (GPUDirect, or staged in pinned host memory); pyverbs |
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdlab.models.kv_cache import KVCache
    from pdlab.transfer.base import KVReceiver, KVSender
    from pdlab.transfer.descriptor import KVDescriptor

PROTOCOLS = ("tcp", "ipc", "rdma")


def make_sender(protocol: str, local: KVCache, dst: KVDescriptor, socket, **rdma) -> KVSender:
    """`rdma` options (others ignore them): `nics` (default $KVCACHE_RDMA_NICS), `gpu_index`
    (default the cache's GPU), `gpudirect` (False: always stage through host memory)."""
    if protocol == "tcp":
        from pdlab.transfer.tcp import TcpSender

        return TcpSender(local, dst, socket)
    if protocol == "ipc":
        if local.kv.is_cuda:
            from pdlab.transfer.cuda_ipc import CudaIpcSender

            return CudaIpcSender(local, dst, socket)
        from pdlab.transfer.shm import ShmSender

        return ShmSender(local, dst, socket)
    if protocol == "rdma":
        from pdlab.transfer.rdma_sender import RdmaSender

        return RdmaSender(local, dst, socket, **rdma)
    raise ValueError(f"unknown KV transfer protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def make_receiver(protocol: str, local: KVCache, **rdma) -> KVReceiver:
    """`rdma` options (others ignore them): `port` (this GPU's rdma comm port; 0: any), `host` (to
    bind), `advertise_host` (where prefills reach it; default `host`), `nics`, `gpu_index`, `gpudirect`
    as for `make_sender`."""
    if protocol == "tcp":
        from pdlab.transfer.tcp import TcpReceiver

        return TcpReceiver(local)
    if protocol == "ipc":
        if local.kv.is_cuda:
            from pdlab.transfer.cuda_ipc import CudaIpcReceiver

            return CudaIpcReceiver(local)
        from pdlab.transfer.shm import ShmReceiver

        return ShmReceiver(local)
    if protocol == "rdma":
        from pdlab.transfer.rdma_receiver import RdmaReceiver

        return RdmaReceiver(local, **rdma)
    raise ValueError(f"unknown KV transfer protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def rdma_status(nics: str | None = None, gpu_index: int = 0) -> tuple[bool, str]:
    """Whether `rdma` can run here, for an instance's start-up: (True, the RDMA device for
    `gpu_index`) or (False, why not, in one line). `nics`: default $KVCACHE_RDMA_NICS."""
    from pdlab.transfer.rdma_setup import rdma_status  # imports pyverbs only to look

    return rdma_status(nics, gpu_index)
