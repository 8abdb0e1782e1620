"""A stand-in prefill instance for decode-side tests: a zmq socket of the test, on loopback.

A decode instance started with `--innode-prefill-ports {fake.port}` sends it
pings and prefill tasks as it would to `python -m pdlab.cluster.instance
--splitwise-role prefill`; the test decides what comes back: pongs (while
`answering`), the KV frames of its choice, `PrefillDone`, or nothing at all.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np
import zmq

from pdlab.cluster.messages import KVLayer, Ping, PrefillDone, PrefillTask, Pong, decode, encode


class FakePrefill:
    """A prefill instance as the decode instance sees it: answers pings, takes tasks, pushes what it is told."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.tasks = self.ctx.socket(zmq.ROUTER)
        self.tasks.setsockopt(zmq.LINGER, 0)
        self.port = self.tasks.bind_to_random_port("tcp://127.0.0.1")
        self.kv: dict[str, zmq.Socket] = {}
        self.answering = True  # False: hang with the connection open (pings go unanswered)
        self.num_pongs = 0
        self.queued: deque[PrefillTask] = deque()  # tasks read while answering pings, not yet taken
        self.others: list = []  # every other message the decode instance sent (AbortPrefill, KVAck)

    def _read_one(self) -> None:
        identity, *frames = self.tasks.recv_multipart()
        message = decode(frames[-1])
        if isinstance(message, Ping):
            if self.answering:
                self.tasks.send_multipart([identity, encode(Pong("prefill:fake", "prefill", "tiny", 64, 64, 0, 0, 0,
                                                                "fake-1"))])
                self.num_pongs += 1
        elif isinstance(message, PrefillTask):
            self.queued.append(message)
        else:
            self.others.append(message)

    def answer_pings(self) -> None:
        """Handle every message waiting now: pings are answered, tasks queued for `next_task`."""
        while self.tasks.poll(0):
            self._read_one()

    def next_task(self, timeout_s: float = 20.0) -> PrefillTask:
        deadline = time.monotonic() + timeout_s
        while not self.queued and time.monotonic() < deadline:
            if self.tasks.poll(50):
                self._read_one()
        assert self.queued, "the decode instance sent no prefill task"
        return self.queued.popleft()

    def next_other(self, kind: type, timeout_s: float = 20.0):
        """The next message of type `kind` (answering pings meanwhile)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [m for m in self.others if isinstance(m, kind)]
            if found:
                self.others.remove(found[0])
                return found[0]
            if self.tasks.poll(50):
                self._read_one()
        raise AssertionError(f"the decode instance sent no {kind.__name__}")

    def send(self, task: PrefillTask, frames: list[bytes]) -> None:
        endpoint = task.kv.cache_endpoint
        if endpoint not in self.kv:
            sock = self.kv[endpoint] = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(endpoint)
        self.kv[endpoint].send_multipart(frames)

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def layer_frames(task: PrefillTask, layer: int, blocks: list[int], payload_bytes: int | None = None,
                 seed: int = 0) -> list[bytes]:
    """One KVLayer frame of random KV (drawn from `seed` and the layer) for `blocks`; a payload of
    `payload_bytes` if given."""
    kv = task.kv
    shape = (2, len(blocks), kv.block_size, kv.num_kv_heads, kv.head_dim)
    data = np.random.default_rng([seed, layer]).standard_normal(shape, dtype=np.float32).tobytes()
    if payload_bytes is not None:
        data = data[:payload_bytes]
    return [encode(KVLayer(task.request_id, layer, blocks, kv.dtype, shape)), data]


def push_all(fake: FakePrefill, task: PrefillTask, chunks: list[list[int]], skip=()) -> int:
    """Every layer of each chunk (a list of destination blocks), less the (chunk, layer) pairs in `skip`;
    returns how many frames a real prefill would have sent."""
    sent = 0
    for c, blocks in enumerate(chunks):
        for layer in range(task.kv.num_layers):
            sent += 1
            if (c, layer) not in skip:
                fake.send(task, layer_frames(task, layer, blocks))
    return sent


def done(fake: FakePrefill, task: PrefillTask, num_frames: int) -> None:
    fake.send(task, [encode(PrefillDone(task.request_id, 7, None, "prefill:fake", num_frames))])


# How the stand-in sends the KV of a 40-token prompt (3 blocks), in two chunks: tokens 0-23, 24-39
# (blocks 0-1, then 1-2: block 1 comes in both, as with chunked prefill).
def chunks_of(task: PrefillTask) -> list[list[int]]:
    b = task.dst_block_ids
    return [b[0:2], b[1:3]]


def complete(fake: FakePrefill, task: PrefillTask) -> None:
    done(fake, task, push_all(fake, task, chunks_of(task)))
