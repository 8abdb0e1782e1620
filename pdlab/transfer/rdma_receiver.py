"""The decode side of the `rdma` transport (docs/rdma.md): remote writes land in this instance's KV cache.

`RdmaReceiver` opens its NIC (`KVCACHE_RDMA_NICS`, the one at `gpu_index %
len(nics)`), registers its KV cache with LOCAL_WRITE | REMOTE_WRITE and listens
on its rdma comm port (`--rdma-comm-ports`, one per GPU) for queue-pair set-up:
a prefill instance (`rdma_sender.RdmaSender`) connects over plain TCP and sends
its RC queue pair (`RdmaHello`); a listener thread answers with this side's
queue pair and memory region (`RdmaWelcome`), and both move their QP
INIT -> RTR -> RTS. TCP, not the zmq control plane: the exchange is a
synchronous request/reply that the thread answers while the decode loop is
busy, it needs no change to the instance's sockets, and it is the port
FastDeploy already has. The connection then stays open and idle: when it
closes, the receiver destroys that QP.

A CUDA cache is registered directly when GPUDirect RDMA works (registering the
CUDA pointer succeeds: nvidia-peermem is loaded). Otherwise the receiver
registers a host mirror of its cache (same layout, as large) and copies a
finished request's blocks into the GPU in `commit`, which the decode instance
calls on `PrefillDone`, before the request runs.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading

import torch

from pdlab.models.kv_cache import KVCache
from pdlab.transfer.base import KVReceiver, TransferError
from pdlab.transfer.rdma_setup import SETUP_TIMEOUT_S, RdmaHello, RdmaRefused, RdmaWelcome, recv_setup, send_setup
from pdlab.transfer.rdma_verbs import Nic, PyverbsError, device_index, require_pyverbs

log = logging.getLogger("pdlab.transfer.rdma")

if isinstance(PyverbsError, type):  # pyverbs imported (optional: rdma_verbs.py says what happens without it)
    from pdlab.transfer.rdma_verbs import CQ, QP, e


class RdmaReceiver(KVReceiver):
    """Registers the local cache and answers QP set-up on `host:port` from a listener thread.

    `port` is this GPU's rdma comm port (0: any free port), bound on `host`;
    `descriptor_fields` names it at `advertise_host` (default `host`), where
    prefill instances connect. Remote writes land in the cache itself (CPU, or GPU
    with GPUDirect) or in a pinned host mirror of it, as large as the cache;
    the decode instance calls `commit` with a request's block ids once its
    `PrefillDone` has arrived, before reading them.
    """

    def __init__(self, local: KVCache, nics: str | None = None, port: int = 0, host: str = "127.0.0.1",
                 advertise_host: str | None = None, gpu_index: int | None = None, gpudirect: bool = True) -> None:
        super().__init__(local)
        gpu_index = device_index(local.kv, gpu_index)
        require_pyverbs(nics, gpu_index)
        self.nic = Nic(nics, gpu_index)
        kv = local.kv
        # REMOTE_READ serves only the sender's flush read (GPU memory).
        access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_REMOTE_READ
        try:
            self.mr = self.nic.register_cache(kv, access, gpudirect)
            self.mirror = None
            if self.mr is None:
                self.mirror = torch.empty(kv.shape, dtype=kv.dtype, pin_memory=True)  # [L, 2, N, bs, H, D]
                self.mr = self.nic.register(self.mirror, access)
            self.cq = CQ(self.nic.ctx, 16)  # receiver QPs post nothing, but RC QPs need a CQ
            self.listener = socket.create_server((host, port))
        except (TransferError, PyverbsError, OSError) as err:
            self.nic.close()
            raise TransferError(f"rdma receiver on {host}:{port}: {err}") from None
        self.on_gpu = kv.is_cuda and self.mirror is None
        self.endpoint = f"{advertise_host or host}:{self.listener.getsockname()[1]}"
        self.qps: dict[socket.socket, QP] = {}  # one per connected sender; the listener thread owns them
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"rdma-listener-{self.endpoint}", daemon=True)
        self._thread.start()

    def descriptor_fields(self) -> dict:
        return {"rdma_endpoint": self.endpoint}

    def commit(self, block_ids: list[int]) -> None:
        """Make the blocks of a finished transfer visible in the cache (host-staged: copy them to the GPU)."""
        if self.mirror is None or not block_ids:
            return
        kv = self.local.kv  # [L, 2, N, bs, H, D]
        index = torch.tensor(block_ids, dtype=torch.int64)
        kv.index_copy_(2, index.to(kv.device), self.mirror.index_select(2, index).to(kv.device))

    def _serve(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.listener, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.2):
                    if key.fileobj is self.listener:
                        conn = self._accept()
                        if conn is not None:
                            selector.register(conn, selectors.EVENT_READ)
                    else:  # the sender closed its end (or broke protocol): its QP goes
                        selector.unregister(key.fileobj)
                        self._drop(key.fileobj)
            for conn in list(self.qps):
                self._drop(conn)

    def _accept(self) -> socket.socket | None:
        conn, peer = self.listener.accept()
        qp = None
        try:
            conn.settimeout(SETUP_TIMEOUT_S)
            hello = recv_setup(conn)
            if not isinstance(hello, RdmaHello):
                raise TransferError(f"expected RdmaHello, got {type(hello).__name__}")
            qp, psn = self.nic.create_qp(self.cq, 1, e.IBV_ACCESS_REMOTE_WRITE | e.IBV_ACCESS_REMOTE_READ)
            me = self.nic.endpoint(qp, psn)
            self.nic.connect(qp, me, hello.qp)  # in RTS before the sender can post anything
            send_setup(conn, RdmaWelcome(me, self.mr.buf, self.mr.rkey, self.mr.length, self.on_gpu))
        except Exception as err:  # noqa: BLE001  one bad peer must not stop the listener
            log.warning("rdma set-up from %s refused: %s", peer, err)
            with contextlib.suppress(OSError):
                send_setup(conn, RdmaRefused(str(err)))
            conn.close()
            if qp is not None:
                qp.close()
            return None
        self.qps[conn] = qp
        return conn

    def _drop(self, conn: socket.socket) -> None:
        conn.close()
        qp = self.qps.pop(conn, None)
        if qp is not None:
            with contextlib.suppress(PyverbsError):
                qp.close()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        self.listener.close()
        self.nic.close()


# --- prefill side --------------------------------------------------------------------------
