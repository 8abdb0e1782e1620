"""The `rdma` transport's two sides (pdlab/transfer/rdma_sender.py, rdma_receiver.py): the WRITE arithmetic and
(on a host with an RDMA device) real transfers. Its start-up check and set-up messages: test_rdma_setup.py.

No machine of this project has an RDMA device, so most tests here replace what only a NIC does: `memmove`
for the WRITEs a sender posts (same addresses, same lengths), which checks every offset without a NIC. The
shared contract tests in test_transport_contract.py run `rdma` too where a device exists.
"""

from __future__ import annotations

import ctypes
import random
import socket
import subprocess
import sys
import types
import uuid
from collections import deque

import pytest
import torch
import zmq

from pdlab.models.kv_cache import KVCache
from pdlab.models.presets import PRESETS
from pdlab.transfer import make_receiver, make_sender, rdma_receiver, rdma_sender, rdma_status
from pdlab.transfer.base import TransferError
from pdlab.transfer.descriptor import KVDescriptor
from pdlab.transfer.rdma_sender import RdmaSender

CONFIG = PRESETS["tiny"]
BLOCK_SIZE = 16
RDMA_OK, RDMA_WHY = rdma_status()
needs_rdma = pytest.mark.skipif(not RDMA_OK, reason=f"needs an RDMA device: {RDMA_WHY}")


# --- the WRITEs a sender posts, applied with memmove --------------------------------------------------


def test_contiguous_runs():
    assert rdma_sender.contiguous_runs([], [], 8) == []
    assert rdma_sender.contiguous_runs([3, 4, 5, 9, 10], [0, 1, 2, 3, 4], 8) == [(3, 0, 3), (9, 3, 2)]
    assert rdma_sender.contiguous_runs([3, 4, 5], [7, 9, 10], 8) == [(3, 7, 1), (4, 9, 2)]
    assert rdma_sender.contiguous_runs([5, 4], [1, 2], 8) == [(5, 1, 1), (4, 2, 1)]
    assert rdma_sender.contiguous_runs(list(range(5)), list(range(10, 15)), 2) == [(0, 10, 2), (2, 12, 2), (4, 14, 1)]


class FakeCQ:
    def __init__(self, completions):
        self.completions = list(completions)
        self.closed = False

    def poll(self, n):
        batch, self.completions = self.completions[:n], self.completions[n:]
        return len(batch), batch

    def close(self):
        self.closed = True


class MemmoveSender(RdmaSender):
    """An RdmaSender without a NIC: its posts are carried out with memmove, as the NIC would carry them out."""

    def __init__(self, src: KVCache, dst: KVCache, staging_bytes: int | None = None, max_chain: int = 512,
                 max_run_blocks: int = 1 << 20):
        kv = dst.kv  # [L, 2, N, bs, H, D]
        descriptor = KVDescriptor("decode:test", "rdma", "inproc://unused", kv.shape[0], kv.shape[2], kv.shape[3],
                                  kv.shape[4], kv.shape[5], str(kv.dtype).removeprefix("torch."),
                                  rdma_endpoint="127.0.0.1:1")
        rdma_sender.KVSender.__init__(self, src, descriptor, None)  # checks the layouts; no NIC, no QP set-up
        self.block_bytes = src.kv[0, 0, 0].numel() * src.kv.element_size()
        self.staging = None if staging_bytes is None else torch.zeros(staging_bytes, dtype=torch.uint8)
        self.mr = types.SimpleNamespace(buf=(src.kv if self.staging is None else self.staging).data_ptr(), lkey=1)
        self.remote_addr, self.rkey, self.remote_on_gpu = dst.kv.data_ptr(), 2, False
        self.max_chain, self.max_run_blocks = max_chain, max_run_blocks
        self.qp, self.cq, self.setup = types.SimpleNamespace(close=lambda: None), None, None
        self.inflight, self.num_outstanding, self.staged_bytes, self.last_remote_addr = deque(), 0, 0, None
        self.unconfirmed, self.lost, self.error = set(), set(), ""
        self.remote = (dst.kv.data_ptr(), dst.kv.data_ptr() + dst.num_bytes)
        self.chains: list[int] = []
        self.num_polls = 0

    def _post(self, items, opcode, lkey):
        assert lkey == self.mr.lkey and len(items) <= self.max_chain
        for local_addr, remote_addr, length in items:
            assert self.remote[0] <= remote_addr and remote_addr + length <= self.remote[1], "outside the remote MR"
            ctypes.memmove(remote_addr, local_addr, length)
        self.chains.append(len(items))

    def _poll(self, deadline_s, until):
        self.num_polls += 1
        super()._poll(deadline_s, until)


@pytest.fixture
def fake_enums(monkeypatch):
    """The few pyverbs constants the sender's bookkeeping uses, whether pyverbs is installed or not."""
    monkeypatch.setattr(rdma_sender, "e", types.SimpleNamespace(IBV_WR_RDMA_WRITE=0, IBV_WR_RDMA_READ=4, IBV_WC_SUCCESS=0),
                        raising=False)
    monkeypatch.setattr(rdma_sender, "cqe_status_to_str", lambda status: {12: "transport retry counter exceeded"}[status],
                        raising=False)


def random_bytes(cache: KVCache, seed: int) -> None:
    noise = torch.randint(0, 256, (cache.num_bytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    cache.kv.view(-1).view(torch.uint8).copy_(noise.to(cache.kv.device))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("staging_blocks,device", [
    (None, "cpu"), (3, "cpu"), (64, "cpu"),
    pytest.param(3, "cuda", marks=[pytest.mark.gpu, needs_cuda]),  # memmove reads host memory: staged only
], ids=["direct", "staged-small-ring", "staged", "cuda-staged-small-ring"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_posted_writes_put_every_block_where_it_belongs(fake_enums, staging_blocks, device, dtype):
    src = KVCache(CONFIG, 24, BLOCK_SIZE, dtype, device)
    dst = KVCache(CONFIG, 40, BLOCK_SIZE, dtype, "cpu")
    random_bytes(src, 1)
    random_bytes(dst, 2)
    block_bytes = src.kv[0, 0, 0].numel() * src.kv.element_size()
    sender = MemmoveSender(src, dst, None if staging_blocks is None else staging_blocks * 2 * block_bytes,
                           max_chain=5, max_run_blocks=3)
    before = dst.kv.clone()
    rng = random.Random(0)
    free = [b for b in range(40) if b not in range(30, 37)]
    rng.shuffle(free)
    mappings = [(list(range(2, 9)), list(range(30, 37)))]  # contiguous on both sides: few WRITEs
    for _ in range(3):
        n = rng.randint(1, 6)
        mappings.append((rng.sample(range(24), n), [free.pop() for _ in range(n)]))
    for src_ids, dst_ids in mappings:
        for layer in range(CONFIG.num_layers):
            sender.send_layer("req", layer, src_ids, dst_ids)
    written = set()
    for src_ids, dst_ids in mappings:
        for s, d in zip(src_ids, dst_ids, strict=True):
            assert torch.equal(dst.kv[:, :, d].view(torch.uint8), src.kv[:, :, s].cpu().view(torch.uint8)), (s, d)
            written.add(d)
    untouched = [b for b in range(40) if b not in written]
    assert torch.equal(dst.kv[:, :, untouched].view(torch.uint8), before[:, :, untouched].view(torch.uint8))
    if staging_blocks is None:  # 7 contiguous blocks in runs of at most 3: 3 runs, K and V, in chains of 5
        assert sender.chains[:2 * CONFIG.num_layers] == [5, 1] * CONFIG.num_layers
    if staging_blocks == 3:
        assert sender.num_polls > 0, "a full ring must wait for the writes that read it"
    with pytest.raises(TransferError, match="source blocks for"):
        sender.send_layer("req", 0, [1, 2], [3])


def test_completions_retire_their_chains_and_an_error_drops_the_queue_pair(fake_enums):
    cache = KVCache(CONFIG, 4, BLOCK_SIZE, torch.float32, "cpu")
    sender = MemmoveSender(cache, cache)
    sender.cq = FakeCQ([types.SimpleNamespace(status=0, wr_id=2, vendor_err=0)])
    sender.inflight.extend([(1, 3), (2, 2), (3, 4)])
    sender.num_outstanding = 9
    sender._poll(float("inf"), until=5)  # WR 2's completion retires WR 1's chain too (RC completes in order)
    assert list(sender.inflight) == [(3, 4)] and sender.num_outstanding == 4
    cq = sender.cq = FakeCQ([types.SimpleNamespace(status=12, wr_id=0, vendor_err=0x81)])
    sender.unconfirmed = {"a", "b", "c"}  # requests with writes in those chains
    with pytest.raises(TransferError, match=r"failed: transport retry counter exceeded \(vendor error 0x81\)"):
        sender.flush("a")
    assert cq.closed and sender.qp is None and not sender.inflight and sender.num_outstanding == 0

    # Every request whose writes the error may have dropped hears of it, once, wherever it is.
    with pytest.raises(TransferError, match="RDMA writes of b to decode:test were lost: RDMA write to decode:test"):
        sender.flush("b")
    sender.flush("b")
    sender.flush("a")  # told already
    with pytest.raises(TransferError, match="earlier RDMA writes of c to decode:test were lost"):
        sender.send_layer("c", 0, [0], [1])
    sender.unconfirmed, sender.lost = set(), {"d", "e"}
    with pytest.raises(TransferError, match="RDMA writes of d, e to decode:test were lost"):
        sender.flush()  # without a request id: once, for all
    sender.flush()
    sender.lost = {"f"}
    sender.abort("f")
    sender.flush()

    sender.cq = FakeCQ([])
    sender.qp, sender.inflight = types.SimpleNamespace(close=lambda: None), deque([(4, 1)])
    with pytest.raises(TransferError, match="no completion within"):
        sender._poll(0.0, until=1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
def test_commit_copies_a_finished_requests_blocks_from_the_host_mirror(device):
    """Host-staged receive: remote writes land in the mirror; `commit` moves exactly those blocks into the cache."""
    cache = KVCache(CONFIG, 12, BLOCK_SIZE, torch.bfloat16, device)
    receiver = rdma_receiver.RdmaReceiver.__new__(rdma_receiver.RdmaReceiver)  # no NIC: only the mirror and the cache
    mirror = KVCache(CONFIG, 12, BLOCK_SIZE, torch.bfloat16, "cpu")  # pinned, on a real receiver
    random_bytes(cache, 1)
    random_bytes(mirror, 2)
    receiver.local, receiver.mirror = cache, mirror.kv
    before = cache.kv.cpu()
    receiver.commit([7, 2, 3])
    receiver.commit([])
    after = cache.kv.cpu()
    assert torch.equal(after[:, :, [7, 2, 3]].view(torch.uint8), receiver.mirror[:, :, [7, 2, 3]].view(torch.uint8))
    others = [b for b in range(12) if b not in (7, 2, 3)]
    assert torch.equal(after[:, :, others].view(torch.uint8), before[:, :, others].view(torch.uint8))


def test_a_sender_needs_an_rdma_endpoint():
    cache = KVCache(CONFIG, 4, BLOCK_SIZE, torch.float32, "cpu")
    kv = cache.kv
    descriptor = KVDescriptor("decode:x", "rdma", "inproc://x", kv.shape[0], kv.shape[2], kv.shape[3], kv.shape[4],
                              kv.shape[5], "float32")
    with pytest.raises(TransferError, match="offers no rdma endpoint"):
        make_sender("rdma", cache, descriptor, None)


# --- real transfers (a host with an RDMA device) -------------------------------------------------------


def devices_for_real_runs():
    yield pytest.param("cpu", True, id="cpu")
    if torch.cuda.is_available():
        yield pytest.param("cuda", True, id="cuda-gpudirect-if-available")
        yield pytest.param("cuda", False, id="cuda-host-staged")


@needs_rdma
@pytest.mark.parametrize("device,gpudirect", list(devices_for_real_runs()))
def test_a_real_transfer_over_the_nic(device, gpudirect):
    """Loopback through one NIC: receiver and sender in this process, each with its own QP."""
    ctx = zmq.Context()
    src = KVCache(CONFIG, 24, BLOCK_SIZE, torch.bfloat16, device)
    dst = KVCache(CONFIG, 40, BLOCK_SIZE, torch.bfloat16, device)
    src.kv.copy_(torch.randn(src.kv.shape, generator=torch.Generator().manual_seed(1)).to(src.kv))
    receiver = make_receiver("rdma", dst, port=0, host="127.0.0.1", gpudirect=gpudirect)
    kv = dst.kv
    descriptor = KVDescriptor("decode:test", "rdma", f"inproc://{uuid.uuid4().hex}", kv.shape[0], kv.shape[2],
                              kv.shape[3], kv.shape[4], kv.shape[5], "bfloat16", **receiver.descriptor_fields())
    sender = make_sender("rdma", src, descriptor, ctx.socket(zmq.PAIR), gpudirect=gpudirect)
    try:
        mappings = [([0, 1, 2, 3], [8, 9, 10, 11]), ([5, 17, 6], [0, 30, 1])]
        for src_ids, dst_ids in mappings:
            sender.send_layers("req", range(CONFIG.num_layers), src_ids, dst_ids)
        sender.flush()
        receiver.commit([d for _, ids in mappings for d in ids])
        for src_ids, dst_ids in mappings:
            assert torch.equal(dst.kv[:, :, dst_ids].cpu(), src.kv[:, :, src_ids].cpu())

        # A bad rkey fails on the remote NIC: flush says so, and the next request's send sets up a new QP.
        sender.rkey ^= 0x5A5A
        sender.send_layer("bad", 0, [4], [20])
        with pytest.raises(TransferError, match="RDMA write to decode:test failed"):
            sender.flush("bad")
        assert sender.qp is None
        sender.send_layer("next", 1, [7], [21])
        sender.flush("next")
        receiver.commit([21])
        assert torch.equal(dst.kv[1, :, 21].cpu(), src.kv[1, :, 7].cpu())
    finally:
        sender.close()
        receiver.close()
        ctx.destroy(linger=0)


@needs_rdma
def test_a_sender_to_a_closed_port_fails_with_a_clear_message():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    cache = KVCache(CONFIG, 4, BLOCK_SIZE, torch.float32, "cpu")
    kv = cache.kv
    descriptor = KVDescriptor("decode:gone", "rdma", "inproc://x", kv.shape[0], kv.shape[2], kv.shape[3], kv.shape[4],
                              kv.shape[5], "float32", rdma_endpoint=f"127.0.0.1:{port}")
    with pytest.raises(TransferError, match=f"rdma set-up with decode:gone at 127.0.0.1:{port}"):
        make_sender("rdma", cache, descriptor, None)


def test_nothing_else_in_pdlab_imports_pyverbs():
    """pyverbs is optional: only the rdma transport (rdma_sender, rdma_receiver) imports it (and rdma_setup,
    when asked to check)."""
    code = ("import sys, pdlab.transfer, pdlab.transfer.rdma_setup, pdlab.transfer.tcp, pdlab.transfer.shm, "
            "pdlab.cluster.messages, pdlab.cluster.instance, pdlab.cluster.decode, pdlab.cluster.prefill; "
            "assert not [m for m in sys.modules if m.startswith('pyverbs')], 'pyverbs imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": ":".join(sys.path)})
