"""Transfer integrity: KV that arrives partly, broken or late never produces a token.

A stand-in prefill instance (a zmq socket of the test, on loopback) takes the
decode instance's prefill tasks and sends the KV the test chooses: a layer
missing, a frame lost, a header without its payload, a payload of the wrong
size, or the sender gone half-way. Every such request ends with an error and
no token, and its blocks are freed; the same stand-in sending every frame gets
an answer (the checks are not vacuous). With a real prefill instance, a
request aborted mid-transfer whose id is reused at once by a new request never
leaks its late messages into the new one.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import numpy as np
import pytest
import zmq

from pdlab import LLM, SamplingParams
from pdlab.cluster.client import RemoteEngine, ping
from pdlab.cluster.messages import KVLayer, Ping, PrefillDone, PrefillTask, Pong, decode, encode
from pdlab.engine.outputs import RequestOutput

from .conftest import instance_args, wait_idle

MAX_LEN = 512
BLOCK_SIZE = 16


class FakePrefill:
    """A prefill instance as the decode instance sees it: answers pings, takes tasks, pushes what it is told."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.tasks = self.ctx.socket(zmq.ROUTER)
        self.tasks.setsockopt(zmq.LINGER, 0)
        self.port = self.tasks.bind_to_random_port("tcp://127.0.0.1")
        self.kv: dict[str, zmq.Socket] = {}

    def next_task(self, timeout_s: float = 20.0) -> PrefillTask:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.tasks.poll(50):
                continue
            identity, *frames = self.tasks.recv_multipart()
            message = decode(frames[-1])
            if isinstance(message, Ping):
                self.tasks.send_multipart([identity, encode(Pong("prefill:fake", "prefill", "tiny", 64, 64, 0, 0, 0,
                                                                "fake-1"))])
            elif isinstance(message, PrefillTask):
                return message
        raise AssertionError("the decode instance sent no prefill task")

    def answer_pings(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.tasks.poll(20):
                identity, *frames = self.tasks.recv_multipart()
                if isinstance(decode(frames[-1]), Ping):
                    self.tasks.send_multipart([identity, encode(Pong("prefill:fake", "prefill", "tiny", 64, 64, 0, 0,
                                                                    0, "fake-1"))])

    def send(self, task: PrefillTask, frames: list[bytes]) -> None:
        endpoint = task.kv.cache_endpoint
        if endpoint not in self.kv:
            sock = self.kv[endpoint] = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(endpoint)
        self.kv[endpoint].send_multipart(frames)

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def layer_frames(task: PrefillTask, layer: int, blocks: list[int], payload_bytes: int | None = None) -> list[bytes]:
    """One KVLayer frame of random KV for `blocks` (a payload of `payload_bytes` if given)."""
    kv = task.kv
    shape = (2, len(blocks), kv.block_size, kv.num_kv_heads, kv.head_dim)
    data = np.random.default_rng(layer).standard_normal(shape, dtype=np.float32).tobytes()
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


def complete(fake, task):
    done(fake, task, push_all(fake, task, chunks_of(task)))


def a_layer_missing(fake, task):
    done(fake, task, push_all(fake, task, chunks_of(task), skip={(0, 1), (1, 1)}))


def a_frame_lost(fake, task):
    """Every layer of every block arrives at least once, but the second update of block 1's layer 0 does not
    (only the frame count tells)."""
    b = task.dst_block_ids
    done(fake, task, push_all(fake, task, [b[0:2], b[1:2], b[2:3]], skip={(1, 0)}))


def a_header_without_payload(fake, task):
    sent = push_all(fake, task, chunks_of(task), skip={(1, 1)})
    fake.send(task, layer_frames(task, 1, chunks_of(task)[1])[:1])
    done(fake, task, sent)


def a_truncated_payload(fake, task):
    sent = push_all(fake, task, chunks_of(task), skip={(1, 1)})
    fake.send(task, layer_frames(task, 1, chunks_of(task)[1], payload_bytes=100))
    done(fake, task, sent)


def cut_half_way(fake, task):
    push_all(fake, task, chunks_of(task)[:1])
    fake.close()  # the prefill is gone: no more frames, no PrefillDone


CASES: dict[str, Callable] = {
    "a layer missing": a_layer_missing,
    "a frame lost": a_frame_lost,
    "a header without its payload": a_header_without_payload,
    "a truncated payload": a_truncated_payload,
}


@pytest.fixture(scope="module")
def fake_pair(module_cluster):
    fake = FakePrefill()
    decode_proc = module_cluster.start("decode", "tiny", instance_args(
        "tcp", MAX_LEN, 2.0, ["--innode-prefill-ports", str(fake.port), "--num-gpu-blocks", "64"]))
    decode_proc.wait_ready(120)
    yield fake, decode_proc
    fake.close()


def run_one(fake_pair, how: Callable, request_id: str) -> RequestOutput:
    fake, decode_proc = fake_pair
    engine = RemoteEngine(decode_proc.endpoint)
    try:
        engine.add_request(list(range(3, 43)), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                           request_id)
        task = fake.next_task()
        assert len(task.dst_block_ids) == 3 and task.request_id.startswith(request_id)
        how(fake, task)
        deadline = time.monotonic() + 20
        outs = {}
        while engine.has_unfinished() and time.monotonic() < deadline:
            outs.update((o.request_id, o) for o in engine.step() if o.finished)
            if how is not cut_half_way:
                fake.answer_pings(0.0)
        assert request_id in outs, f"the request never ended\n{decode_proc.log_tail(20)}"
        return outs[request_id]
    finally:
        engine.close()


def test_a_complete_transfer_from_the_stand_in_is_answered(fake_pair):
    out = run_one(fake_pair, complete, "ok")
    assert out.error is None and out.token_ids[0] == 7 and len(out.token_ids) == 8
    wait_idle({"decode": fake_pair[1].endpoint}, 10.0)


@pytest.mark.parametrize("what", list(CASES))
def test_a_broken_transfer_never_produces_a_token(fake_pair, what: str):
    out = run_one(fake_pair, CASES[what], f"bad-{what.replace(' ', '-')}")
    assert out.finish_reason == "error" and out.token_ids == [], (out.finish_reason, out.token_ids, out.error)
    assert "KV transfer" in out.error, out.error
    wait_idle({"decode": fake_pair[1].endpoint}, 10.0, lambda: fake_pair[1].log_tail(20))


def test_the_sender_gone_half_way_ends_the_request(cluster):
    fake = FakePrefill()
    decode_proc = cluster.start("decode", "tiny", instance_args(
        "tcp", MAX_LEN, 2.0, ["--innode-prefill-ports", str(fake.port), "--num-gpu-blocks", "64"]))
    decode_proc.wait_ready(120)
    start_s = time.monotonic()
    out = run_one((fake, decode_proc), cut_half_way, "cut")
    assert out.finish_reason == "error" and out.token_ids == [] and "KV never arrived" in out.error, out.error
    assert time.monotonic() - start_s < 3 * 2.0 + 5, "it should end within a few transfer timeouts"
    wait_idle({"decode": decode_proc.endpoint}, 10.0, lambda: decode_proc.log_tail(20))


# --- a real pair: late messages of an aborted transfer -------------------------------------------------


def test_a_request_id_reused_right_after_an_abort_gets_only_its_own_kv(cluster):
    """Abort a request while the prefill pushes its KV, then send a new request under the same id at once:
    the aborted transfer's late frames, PrefillDone or PrefillFailed must not count for the new one, which
    must answer exactly as the colocated engine."""
    pair = cluster.pair("tiny", "tcp", max_model_len=MAX_LEN, prefill_args=["--max-num-batched-tokens", "16"],
                        decode_args=["--num-gpu-blocks", "96"]).wait_ready()
    llm = LLM("tiny", device="cpu", max_model_len=MAX_LEN)
    rng = random.Random(5)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine = RemoteEngine(pair.decode.endpoint)
    got: list[RequestOutput] = []
    prompts = []
    try:
        for round_ in range(8):
            long_prompt = [rng.randrange(3, 512) for _ in range(rng.choice([40, 200, 460]))]
            engine.add_request(long_prompt, params, "x")
            deadline = time.monotonic() + 10
            # Abort at different points: before, during and (for short prompts) after the prefill ends.
            while time.monotonic() < deadline and round_ % 3:
                pong = ping(pair.prefill.endpoint)
                if pong is not None and pong.num_running + pong.num_held >= 1:
                    break
            engine.abort("x")
            aborted = engine.drain(10.0)["x"]
            assert aborted.finish_reason in ("abort", "length"), aborted.error
            prompt = [rng.randrange(3, 512) for _ in range(rng.randrange(5, 60))]
            prompts.append(prompt)
            engine.add_request(prompt, params, "x")
            got.append(engine.drain(30.0)["x"])
    finally:
        engine.close()
    errors = [o.error for o in got if o.error]
    assert not errors, f"{errors}\n{pair.logs()}"
    assert [o.token_ids for o in got] == [w.token_ids for w in llm.generate(prompts, params)]
    pair.wait_idle()
