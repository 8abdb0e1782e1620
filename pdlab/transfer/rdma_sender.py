"""The prefill side of the `rdma` transport (docs/rdma.md): one-sided RDMA WRITEs into a decode instance's KV cache.

FastDeploy's kvcache_transfer, in Python (the start-up check and the set-up
messages: rdma_setup.py; the NIC, its memory registrations and queue pairs:
rdma_verbs.py; the decode side: rdma_receiver.py):
- `RdmaSender` connects to the decode instance's rdma comm port over TCP, sends
  its RC queue pair (`RdmaHello`) and gets the receiver's queue pair and memory
  region back (`RdmaWelcome`).
- `send_layer` posts one RDMA WRITE per run of blocks contiguous on both sides,
  for K and for V, chained (at most MAX_CHAIN per post), only the last one
  signalled. `flush` polls the CQ until every signalled WR has completed and
  raises TransferError on an error completion; the QP is then dropped and the
  next `send_layer` sets up a new one.
- Completion reaches the decode side through the control plane, as for the
  other transports: the prefill sends `PrefillDone` after `flush` (no WRITE
  with immediate data, which would need posted receives and a thread polling
  the decode side's CQ). When the target is GPU memory, `flush` ends with an
  8-byte RDMA READ over the same QP, so that the remote NIC's writes have
  reached GPU memory before it returns (FastDeploy's KVCACHE_GDRCOPY_FLUSH_ENABLE).
- A CUDA cache is registered directly when GPUDirect RDMA works. Otherwise the
  sender gathers each layer's blocks into a pinned, registered ring of
  STAGING_BYTES and writes from there (the receiver then writes into a host
  mirror of its cache).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections import deque

import torch

from pdlab.models.kv_cache import KVCache
from pdlab.transfer.base import KVSender, TransferError, gather_blocks
from pdlab.transfer.descriptor import KVDescriptor
from pdlab.transfer.rdma_setup import SETUP_TIMEOUT_S, RdmaHello, RdmaRefused, RdmaWelcome, recv_setup, send_setup
from pdlab.transfer.rdma_verbs import Nic, PyverbsError, device_index, require_pyverbs

log = logging.getLogger("pdlab.transfer.rdma")

if isinstance(PyverbsError, type):  # pyverbs imported (optional: rdma_verbs.py says what happens without it)
    from pdlab.transfer.rdma_verbs import CQ, MR, SGE, SendWR, cqe_status_to_str, e

SQ_DEPTH = 4096  # send-queue slots (capped by the device); a post waits for room rather than overflow it
MAX_CHAIN = 512  # WRs per ibv_post_send
STAGING_BYTES = 256 << 20  # a sender's pinned staging ring, when its GPU cache cannot be registered
MAX_WRITE_BYTES = 1 << 30  # one WRITE moves at most this much (and at most the port's max_msg_sz)
FLUSH_TIMEOUT_S = 30.0


def contiguous_runs(src: list[int], dst: list[int], max_blocks: int) -> list[tuple[int, int, int]]:
    """(first source block, first destination block, count) of each run consecutive on both sides."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1][2] < max_blocks and (s, d) == (runs[-1][0] + runs[-1][2], runs[-1][1] + runs[-1][2]):
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


class RdmaSender(KVSender):
    """Writes into one decode instance's cache over one RC QP, set up at construction.

    The NIC reads the local cache itself (CPU, or GPU with GPUDirect), or a
    pinned staging ring of STAGING_BYTES into which each layer's blocks are
    gathered (GPU without GPUDirect); when the ring is full, `send_layer` first
    waits for the writes that read it.

    After an error completion the QP is dropped and the next `send_layer` sets
    up a new one; every request with writes still unconfirmed then is lost:
    its next `send_layer`, or `flush(request_id)`, raises TransferError.
    """

    def __init__(self, local: KVCache, dst: KVDescriptor, socket, nics: str | None = None,
                 gpu_index: int | None = None, gpudirect: bool = True) -> None:
        super().__init__(local, dst, socket)
        host, _, port = dst.rdma_endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise TransferError(f"decode instance {dst.instance_id} offers no rdma endpoint "
                                f"(rdma_endpoint={dst.rdma_endpoint!r})")
        self.address = (host.strip("[]"), int(port))
        kv = local.kv  # [L, 2, N, bs, H, D]
        self.block_bytes = kv[0, 0, 0].numel() * kv.element_size()
        gpu_index = device_index(kv, gpu_index)
        require_pyverbs(nics, gpu_index)
        self.nic = Nic(nics, gpu_index)
        self.qp = self.cq = self.setup = None
        self.inflight: deque[tuple[int, int]] = deque()  # (wr_id of a signalled WR, WRs it retires), in post order
        self.num_outstanding = 0  # WRs posted and not yet known complete
        self.next_wr_id = 1
        self.last_remote_addr: int | None = None  # of the latest WRITE: where a flush read goes
        self.staged_bytes = 0  # of the staging ring, in use by posted WRs
        self.unconfirmed: set[str] = set()  # requests with WRs posted since the send queue was last empty
        self.lost: set[str] = set()  # requests whose writes an error may have dropped, not yet told
        self.error = ""  # the last error
        try:
            self.mr = self.nic.register_cache(kv, e.IBV_ACCESS_LOCAL_WRITE, gpudirect)
            self.staging = None
            if self.mr is None:
                self.staging = torch.empty(max(STAGING_BYTES, 2 * self.block_bytes), dtype=torch.uint8, pin_memory=True)
                self.mr = self.nic.register(self.staging, e.IBV_ACCESS_LOCAL_WRITE)
            self.scratch = MR(self.nic.pd, 64, e.IBV_ACCESS_LOCAL_WRITE)  # where flush reads land
            self.sq_depth = min(SQ_DEPTH, self.nic.device.max_qp_wr)
            self.max_chain = max(1, min(MAX_CHAIN, self.sq_depth // 2))
            self.max_run_blocks = max(1, min(MAX_WRITE_BYTES, self.nic.port.max_msg_sz) // self.block_bytes)
            self._connect()
        except (TransferError, PyverbsError) as err:
            self.nic.close()
            raise TransferError(str(err)) from None

    def _connect(self) -> None:
        try:
            self.cq = CQ(self.nic.ctx, self.sq_depth + 1)
            self.qp, psn = self.nic.create_qp(self.cq, self.sq_depth, 0)
            me = self.nic.endpoint(self.qp, psn)
            self.setup = socket.create_connection(self.address, timeout=SETUP_TIMEOUT_S)
            send_setup(self.setup, RdmaHello(me))
            reply = recv_setup(self.setup)
            if isinstance(reply, RdmaRefused):
                raise TransferError(f"refused: {reply.error}")
            if not isinstance(reply, RdmaWelcome):
                raise TransferError(f"expected RdmaWelcome, got {type(reply).__name__}")
            expected = self.dst.num_layers * 2 * self.dst.num_blocks * self.block_bytes
            if reply.length != expected:
                raise TransferError(f"it registered {reply.length} bytes; its descriptor says {expected}")
            self.nic.connect(self.qp, me, reply.qp)
        except (OSError, TransferError, PyverbsError) as err:
            self._reset()
            raise TransferError(f"rdma set-up with {self.dst.instance_id} at {self.dst.rdma_endpoint}: {err}") from None
        self.remote_addr, self.rkey, self.remote_on_gpu = reply.addr, reply.rkey, reply.on_gpu

    def _reset(self, error: str = "") -> str:
        """Drop the connection, QP and CQ (after an error the QP is useless); the next send sets up new ones.
        With an `error`, the requests with unconfirmed writes are lost; returns the error."""
        if self.setup is not None:
            self.setup.close()
        for resource in (self.qp, self.cq):
            if resource is not None:
                with contextlib.suppress(PyverbsError):
                    resource.close()
        self.qp = self.cq = self.setup = None
        self.inflight.clear()
        self.num_outstanding = self.staged_bytes = 0
        self.last_remote_addr = None
        if error:
            self.lost |= self.unconfirmed
            self.error = error
        self.unconfirmed.clear()
        return error

    def send_layer(self, request_id: str, layer: int, src_block_ids: list[int], dst_block_ids: list[int]) -> None:
        self.check_blocks(src_block_ids, self.local.num_blocks, "source")
        self.check_blocks(dst_block_ids, self.dst.num_blocks, "destination")
        if len(src_block_ids) != len(dst_block_ids):
            raise TransferError(f"{len(src_block_ids)} source blocks for {len(dst_block_ids)} destination blocks")
        if request_id in self.lost:
            self.lost.discard(request_id)
            raise TransferError(f"earlier RDMA writes of {request_id} to {self.dst.instance_id} were lost: "
                                f"{self.error}")
        if not src_block_ids:
            return
        if self.qp is None:
            self._connect()
        self.unconfirmed.add(request_id)
        try:
            self._send_layer(layer, src_block_ids, dst_block_ids)
        except TransferError:
            self.lost.discard(request_id)  # told, by this
            raise

    def _send_layer(self, layer: int, src_block_ids: list[int], dst_block_ids: list[int]) -> None:
        kv, size = self.local.kv, self.block_bytes  # [L, 2, N, bs, H, D]
        if self.staging is None:  # the NIC reads the cache: [2, N] blocks of this layer from `base`
            if kv.is_cuda:  # GPUDirect: the layer must be in GPU memory before the NIC reads it
                torch.cuda.current_stream(kv.device).synchronize()
            base = self.mr.buf + layer * 2 * self.local.num_blocks * size
            self._write(layer, src_block_ids, dst_block_ids, base, self.local.num_blocks)
            return
        per_chunk = len(self.staging) // (2 * size)
        for first in range(0, len(src_block_ids), per_chunk):
            src, dst = src_block_ids[first: first + per_chunk], dst_block_ids[first: first + per_chunk]
            need = 2 * len(src) * size
            if self.staged_bytes + need > len(self.staging):
                self._poll(time.monotonic() + FLUSH_TIMEOUT_S, until=self.num_outstanding)  # the ring is free again
                self.staged_bytes = 0
            offset = self.staged_bytes
            staged = self.staging[offset: offset + need].view(kv.dtype).view(2, len(src), *kv.shape[3:])
            staged.copy_(gather_blocks(kv, layer, src))  # [2, n, bs, H, D]; returns once in host memory
            self.staged_bytes += need
            self._write(layer, list(range(len(src))), dst, self.mr.buf + offset, len(src))

    def _write(self, layer: int, src: list[int], dst: list[int], base: int, num_src_blocks: int) -> None:
        """WRITEs of K and V of `src` (blocks of a [2, num_src_blocks] array at `base`) to the remote `dst`."""
        n_dst, size = self.dst.num_blocks, self.block_bytes
        writes = []
        for s, d, n in contiguous_runs(src, dst, self.max_run_blocks):
            for half in (0, 1):  # K, V
                writes.append((base + (half * num_src_blocks + s) * size,
                               self.remote_addr + ((layer * 2 + half) * n_dst + d) * size, n * size))
        for first in range(0, len(writes), self.max_chain):
            self._post(writes[first: first + self.max_chain], e.IBV_WR_RDMA_WRITE, self.mr.lkey)
        self.last_remote_addr = writes[-1][1]

    def _post(self, items: list[tuple[int, int, int]], opcode: int, lkey: int) -> None:
        """One chain of WRs (local address, remote address, bytes); only the last one signalled."""
        if self.num_outstanding + len(items) > self.sq_depth:  # no room in the send queue: wait for some
            self._poll(time.monotonic() + FLUSH_TIMEOUT_S, until=self.num_outstanding + len(items) - self.sq_depth)
        wr_id = self.next_wr_id
        self.next_wr_id += 1
        wrs = []
        for i, (local_addr, remote_addr, length) in enumerate(items):
            last = i == len(items) - 1
            sge = SGE(local_addr, length, lkey)
            wr = SendWR(wr_id=wr_id if last else 0, opcode=opcode, num_sge=1, sg=[sge],
                        send_flags=e.IBV_SEND_SIGNALED if last else 0)
            sge.close()  # SendWR copied it; pyverbs frees an SGE's or SendWR's memory only in close()
            wr.set_wr_rdma(self.rkey, remote_addr)
            if wrs:
                wrs[-1].next_wr = wr  # a raw pointer: every WR must stay alive until post_send returns
            wrs.append(wr)
        try:
            self.qp.post_send(wrs[0])
        except PyverbsError as err:
            raise TransferError(self._reset(f"RDMA post to {self.dst.instance_id} failed: {err}")) from None
        finally:
            for wr in wrs:
                wr.close()
        self.inflight.append((wr_id, len(items)))
        self.num_outstanding += len(items)

    def _poll(self, deadline_s: float, until: int) -> None:
        """Poll the CQ until `until` more posted WRs are known complete (or none is left)."""
        done = 0
        while done < until and self.inflight:
            n, wcs = self.cq.poll(16)
            for wc in wcs[:n]:
                if wc.status != e.IBV_WC_SUCCESS:
                    what = f"{cqe_status_to_str(wc.status)} (vendor error {wc.vendor_err:#x})"
                    raise TransferError(self._reset(f"RDMA write to {self.dst.instance_id} failed: {what}"))
                while self.inflight and self.inflight[0][0] <= wc.wr_id:  # an RC QP completes in order
                    retired = self.inflight.popleft()[1]
                    done += retired
                    self.num_outstanding -= retired
            if n == 0:
                if time.monotonic() > deadline_s:
                    raise TransferError(self._reset(f"RDMA writes to {self.dst.instance_id}: no completion "
                                                    f"within {FLUSH_TIMEOUT_S:.0f} s"))
                time.sleep(0)
        if not self.inflight:
            self.unconfirmed.clear()

    def flush(self, request_id: str | None = None) -> None:
        """Wait for every posted WRITE; raise TransferError if `request_id`'s writes were lost. Without
        `request_id` (the base contract), the first flush after an error raises, once, for all the
        requests it lost: a second request of that batch would pass, so callers should pass it."""
        told = set(self.lost) if request_id is None else {request_id}
        try:
            if self.qp is not None and self.inflight:
                if self.remote_on_gpu and self.last_remote_addr is not None:
                    # A READ behind WRITEs on one QP completes once they have reached GPU memory (PCIe ordering).
                    self._post([(self.scratch.buf, self.last_remote_addr, 8)], e.IBV_WR_RDMA_READ, self.scratch.lkey)
                    self.last_remote_addr = None
                self._poll(time.monotonic() + FLUSH_TIMEOUT_S, until=self.num_outstanding)
                self.staged_bytes = 0
            lost = sorted(self.lost & told)
            if lost:
                raise TransferError(f"RDMA writes of {', '.join(lost)} to {self.dst.instance_id} were lost: "
                                    f"{self.error}")
        finally:
            self.lost -= told

    def abort(self, request_id: str) -> None:
        self.lost.discard(request_id)  # posted WRs cannot be recalled; the decode side holds the blocks

    def close(self) -> None:
        if self.nic is None:
            return
        with contextlib.suppress(TransferError):
            self.flush()
        self._reset()
        self.nic.close()
        self.nic = None
