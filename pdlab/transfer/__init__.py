"""KV transports: move a request's KV blocks from a prefill instance's cache into a decode instance's.

`make_sender(protocol, ...)` and `make_receiver(protocol, ...)` pick one by
name; the modules are imported only when used.

| protocol | device | how |
|---|---|---|
| `tcp`  | any  | host-staged: each layer's blocks are gathered, sent as one zmq frame, scattered on the decode side |
| `ipc`  | CPU  | the decode instance's KV cache lives in shared memory; the prefill instance writes into it |
| `ipc`  | CUDA | CUDA IPC handle of the decode cache; one kernel on the prefill GPU writes the blocks through peer access |
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pdlab.cluster.messages import KVDescriptor
    from pdlab.engine.kv_cache import KVCache
    from pdlab.transfer.base import KVReceiver, KVSender

PROTOCOLS = ("tcp", "ipc")


def make_sender(protocol: str, local: KVCache, dst: KVDescriptor, socket) -> KVSender:
    if protocol == "tcp":
        from pdlab.transfer.tcp import TcpSender

        return TcpSender(local, dst, socket)
    if protocol == "ipc":
        if local.kv.is_cuda:
            from pdlab.transfer.cuda_ipc import CudaIpcSender

            return CudaIpcSender(local, dst, socket)
        from pdlab.transfer.shm import ShmSender

        return ShmSender(local, dst, socket)
    raise ValueError(f"unknown KV transfer protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def make_receiver(protocol: str, local: KVCache) -> KVReceiver:
    if protocol == "tcp":
        from pdlab.transfer.tcp import TcpReceiver

        return TcpReceiver(local)
    if protocol == "ipc":
        if local.kv.is_cuda:
            from pdlab.transfer.cuda_ipc import CudaIpcReceiver

            return CudaIpcReceiver(local)
        from pdlab.transfer.shm import ShmReceiver

        return ShmReceiver(local)
    raise ValueError(f"unknown KV transfer protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
