"""The contract every KV transport keeps (pdlab.transfer.base), checked in one process.

For each transport: random source blocks land bitwise in the destination
blocks they are mapped to, every other destination block is untouched, after
`flush` (ipc; rdma, then the receiver's `commit`) or once the frames handed to
the socket are fed to the receiver (tcp), with `PrefillDone` sent after them
arriving after them. Bad block ids, source and destination lists of different
lengths, mismatched layouts and lying frames raise `TransferError` and change
nothing.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import msgspec
import pytest
import torch
import zmq

from pdlab.cluster.messages import KVDescriptor, KVLayer, PrefillDone, decode, encode
from pdlab.models.kv_cache import KVCache
from pdlab.models.presets import PRESETS
from pdlab.transfer import make_receiver, make_sender, rdma_status
from pdlab.transfer.base import KVReceiver, KVSender, TransferError

CONFIG = PRESETS["tiny"]
BLOCK_SIZE = 16
NUM_SRC_BLOCKS = 24
NUM_DST_BLOCKS = 40
RDMA_OK, RDMA_WHY = rdma_status()

TRANSPORTS = [
    "tcp",
    "ipc",
    pytest.param("cuda", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
    pytest.param("rdma", marks=pytest.mark.skipif(not RDMA_OK, reason=f"needs an RDMA device: {RDMA_WHY}")),
]
DTYPES = [torch.float32, torch.bfloat16]


@dataclass
class Link:
    """A source cache with its sender, a destination cache with its receiver, and the socket pair between them."""

    transport: str  # "tcp", "ipc" (shared memory on CPU), "cuda" (ipc between CUDA caches) or "rdma" (loopback)
    src: KVCache
    dst: KVCache
    receiver: KVReceiver
    descriptor: KVDescriptor
    sender: KVSender
    inbox: zmq.Socket  # the decode side's end of the sender's socket

    @property
    def protocol(self) -> str:
        return self.transport if self.transport in ("tcp", "rdma") else "ipc"

    def frames(self) -> list[list[zmq.Frame]]:
        """Every message queued on the decode side's socket."""
        messages = []
        while self.inbox.poll(100):
            messages.append(self.inbox.recv_multipart(copy=False))
        return messages


def raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of `t`, on the CPU (bitwise comparison: NaN payloads and -0.0 included)."""
    return t.detach().cpu().contiguous().view(torch.uint8)


def fill_random_bytes(cache: KVCache, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (cache.num_bytes,), dtype=torch.uint8, generator=g)
    cache.kv.view(-1).view(torch.uint8).copy_(noise.to(cache.kv.device))


def descriptor_for(dst: KVCache, receiver: KVReceiver, protocol: str, endpoint: str) -> KVDescriptor:
    """As a decode instance builds it (pdlab/cluster/decode.py)."""
    kv = dst.kv  # [L, 2, N, bs, H, D]
    return KVDescriptor(
        instance_id="decode:test", protocol=protocol, cache_endpoint=endpoint,
        num_layers=kv.shape[0], num_blocks=kv.shape[2], block_size=kv.shape[3], num_kv_heads=kv.shape[4],
        head_dim=kv.shape[5], dtype=str(kv.dtype).removeprefix("torch."), host="127.0.0.1",
        **receiver.descriptor_fields(),
    )


@pytest.fixture
def make_link() -> Iterator:
    ctx = zmq.Context()
    made: list[Link] = []

    def make(transport: str, dtype: torch.dtype) -> Link:
        if transport == "cuda":
            import pdlab.transfer.cuda_ipc  # noqa: F401  (imported only where a GPU is)

            src_device = torch.device("cuda", 0)
            dst_device = torch.device("cuda", 1 if torch.cuda.device_count() > 1 else 0)
        else:
            src_device = dst_device = torch.device("cpu")
        src = KVCache(CONFIG, NUM_SRC_BLOCKS, BLOCK_SIZE, dtype, src_device)
        shm_path = f"/dev/shm/pdlab-kv-test-{uuid.uuid4().hex}" if transport == "ipc" else None
        dst = KVCache(CONFIG, NUM_DST_BLOCKS, BLOCK_SIZE, dtype, dst_device, shm_path=shm_path)
        endpoint = f"inproc://kv-{uuid.uuid4().hex}"
        inbox = ctx.socket(zmq.PAIR)
        inbox.bind(endpoint)
        outbox = ctx.socket(zmq.PAIR)
        outbox.connect(endpoint)
        protocol = transport if transport in ("tcp", "rdma") else "ipc"
        receiver = make_receiver(protocol, dst, **({"port": 0, "host": "127.0.0.1"} if protocol == "rdma" else {}))
        descriptor = descriptor_for(dst, receiver, protocol, endpoint)
        fill_random_bytes(src, seed=1)
        fill_random_bytes(dst, seed=2)
        sender = make_sender(descriptor.protocol, src, descriptor, outbox)
        link = Link(transport, src, dst, receiver, descriptor, sender, inbox)
        made.append(link)
        return link

    yield make
    for link in made:
        link.sender.close()
        link.receiver.close()
        link.dst.close()  # removes the shared-memory file
    ctx.destroy(linger=0)


def random_mappings(rng: random.Random, num_requests: int) -> list[tuple[list[int], list[int]]]:
    """(source block ids, destination block ids) per request; destinations disjoint across requests."""
    free = list(range(NUM_DST_BLOCKS))
    rng.shuffle(free)
    mappings = []
    for _ in range(num_requests):
        n = rng.randint(1, 6)
        mappings.append((rng.sample(range(NUM_SRC_BLOCKS), n), [free.pop() for _ in range(n)]))
    return mappings


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_blocks_arrive_bitwise_and_nothing_else_changes(make_link, transport: str, dtype: torch.dtype):
    link = make_link(transport, dtype)
    before = link.dst.kv.detach().cpu().clone()  # [L, 2, N, bs, H, D]
    mappings = random_mappings(random.Random(3), num_requests=4)
    for r, (src_ids, dst_ids) in enumerate(mappings):
        if r % 2:  # a whole request's layers at once
            link.sender.send_layers(f"req{r}", range(CONFIG.num_layers), src_ids, dst_ids)
        else:  # layer by layer, as inside a forward pass
            for layer in range(CONFIG.num_layers):
                link.sender.send_layer(f"req{r}", layer, src_ids, dst_ids)
    link.sender.flush()
    if link.protocol == "tcp":
        # What is handed to the socket before PrefillDone arrives before it, in order.
        link.sender.socket.send(encode(PrefillDone("req3", 7)))
        messages = link.frames()
        kinds = [type(decode(m[0].bytes)).__name__ for m in messages]
        assert kinds == ["KVLayer"] * (len(mappings) * CONFIG.num_layers) + ["PrefillDone"]
        for frames in messages[:-1]:
            link.receiver.write_layer(decode(frames[0].bytes), frames[1].buffer)
    else:
        assert link.frames() == [], "ipc and rdma write the cache directly, nothing goes over the socket"
        if link.protocol == "rdma":  # as the decode instance does on PrefillDone (a no-op for CPU caches)
            link.receiver.commit([d for _, dst_ids in mappings for d in dst_ids])

    after = link.dst.kv.detach().cpu()
    src = link.src.kv.detach().cpu()
    written = set()
    for src_ids, dst_ids in mappings:
        for s, d in zip(src_ids, dst_ids):
            assert torch.equal(raw(after[:, :, d]), raw(src[:, :, s])), f"destination block {d} != source block {s}"
            written.add(d)
    untouched = [b for b in range(NUM_DST_BLOCKS) if b not in written]
    assert torch.equal(raw(after[:, :, untouched]), raw(before[:, :, untouched])), "a block outside the mapping changed"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_out_of_range_block_ids_raise_and_change_nothing(make_link, transport: str):
    link = make_link(transport, torch.float32)
    before = raw(link.dst.kv).clone()
    bad = [([NUM_SRC_BLOCKS], [0]), ([-1], [0]), ([0], [NUM_DST_BLOCKS]), ([0], [-1]),
           ([0, 1], [2, NUM_DST_BLOCKS + 5])]
    for src_ids, dst_ids in bad:
        with pytest.raises(TransferError):
            link.sender.send_layer("req", 0, src_ids, dst_ids)
    link.sender.flush()
    if link.protocol == "tcp":
        assert link.frames() == [], "no frame may be sent for a rejected layer"
    assert torch.equal(raw(link.dst.kv), before)


@pytest.mark.parametrize("change", [
    {"head_dim": CONFIG.head_dim * 2}, {"block_size": BLOCK_SIZE * 2}, {"dtype": "bfloat16"},
    {"num_kv_heads": CONFIG.num_kv_heads + 1}, {"num_layers": CONFIG.num_layers + 1},
], ids=lambda change: next(iter(change)))
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_different_layout_is_refused_at_construction(make_link, transport: str, change: dict):
    link = make_link(transport, torch.float32)
    wrong = msgspec.structs.replace(link.descriptor, **change)
    with pytest.raises(TransferError):
        make_sender(wrong.protocol, link.src, wrong, link.sender.socket)


def one_frame(link: Link, src_ids: list[int], dst_ids: list[int], layer: int = 1) -> tuple[KVLayer, bytes]:
    link.sender.send_layer("req", layer, src_ids, dst_ids)
    link.sender.flush()
    (frames,) = link.frames()
    return decode(frames[0].bytes), frames[1].bytes


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tcp_frames_that_lie_raise_and_change_nothing(make_link, dtype: torch.dtype):
    link = make_link("tcp", dtype)
    header, payload = one_frame(link, [3, 5, 7], [10, 11, 12])
    before = raw(link.dst.kv).clone()
    n, shape = len(header.dst_block_ids), header.shape
    other_dtype = "float32" if dtype == torch.bfloat16 else "bfloat16"
    lies = {
        "truncated payload": (header, payload[:-1]),
        "empty payload": (header, b""),
        "payload too long": (header, payload + b"\x00" * 4),
        "shape claims a block more": (msgspec.structs.replace(header, shape=(2, n + 1, *shape[2:])), payload),
        "shape permuted": (msgspec.structs.replace(header, shape=(2, n, *shape[2:3], shape[4], shape[3])), payload),
        "fewer destination blocks than the payload": (msgspec.structs.replace(header, dst_block_ids=[10, 11]), payload),
        "other dtype": (msgspec.structs.replace(header, dtype=other_dtype), payload),
        "unknown dtype": (msgspec.structs.replace(header, dtype="int8"), payload),
        "layer out of range": (msgspec.structs.replace(header, layer=CONFIG.num_layers), payload),
        "negative layer": (msgspec.structs.replace(header, layer=-1), payload),
        "block out of range": (msgspec.structs.replace(header, dst_block_ids=[10, 11, NUM_DST_BLOCKS]), payload),
        "negative block": (msgspec.structs.replace(header, dst_block_ids=[10, 11, -1]), payload),
    }
    for what, (bad_header, bad_payload) in lies.items():
        with pytest.raises(TransferError):
            link.receiver.write_layer(bad_header, memoryview(bad_payload))
            pytest.fail(f"accepted a frame with {what}")
        assert torch.equal(raw(link.dst.kv), before), f"a frame with {what} changed the cache"
    link.receiver.write_layer(header, memoryview(payload))  # the honest frame still lands
    src = link.src.kv
    assert torch.equal(raw(link.dst.kv[1, :, [10, 11, 12]]), raw(src[1, :, [3, 5, 7]]))


def test_ipc_receivers_take_no_frames(make_link):
    link = make_link("ipc", torch.float32)
    header = KVLayer("req", 0, [0], "float32", (2, 1, BLOCK_SIZE, CONFIG.num_kv_heads, CONFIG.head_dim))
    before = raw(link.dst.kv).clone()
    with pytest.raises(TransferError):
        link.receiver.write_layer(header, memoryview(bytes(4 * BLOCK_SIZE * CONFIG.num_kv_heads * CONFIG.head_dim * 2)))
    assert torch.equal(raw(link.dst.kv), before)


def test_shared_memory_sender_refuses_a_file_that_is_not_the_advertised_cache(make_link):
    """A descriptor naming a missing file, or claiming more blocks than the file holds, is refused:
    the sender must never create or grow files (they would not be the decode instance's cache)."""
    link = make_link("ipc", torch.float32)
    missing = f"/dev/shm/pdlab-kv-test-missing-{uuid.uuid4().hex}"
    size_bytes = link.dst.num_bytes
    try:
        for wrong in (msgspec.structs.replace(link.descriptor, shm_name=missing),
                      msgspec.structs.replace(link.descriptor, num_blocks=NUM_DST_BLOCKS * 2)):
            with pytest.raises(TransferError):
                make_sender("ipc", link.src, wrong, link.sender.socket)
            assert not os.path.exists(missing), "the sender created a file"
            assert os.path.getsize(link.dst.shm_path) == size_bytes, "the sender grew the decode instance's cache file"
    finally:
        if os.path.exists(missing):
            os.unlink(missing)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_source_and_destination_lists_of_different_lengths_raise_and_change_nothing(make_link, transport: str):
    link = make_link(transport, torch.float32)
    before = raw(link.dst.kv).clone()
    for src_ids, dst_ids in [([1, 2], [3]), ([1], [3, 4]), ([], [3]), ([1], [])]:
        with pytest.raises(TransferError, match="source blocks for"):
            link.sender.send_layer("req", 0, src_ids, dst_ids)
        with pytest.raises(TransferError, match="source blocks for"):
            link.sender.send_layers("req", range(CONFIG.num_layers), src_ids, dst_ids)
    link.sender.flush()
    if link.protocol == "tcp":
        assert link.frames() == [], "no frame may be sent for a rejected layer"
    assert torch.equal(raw(link.dst.kv), before)
