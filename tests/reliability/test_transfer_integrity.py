"""Transfer integrity: KV that arrives partly, broken, late or never never produces a token.

A stand-in prefill instance (tests/cluster/fake_prefill.py) takes the decode
instance's prefill tasks, answers its heartbeats, and sends the KV the test
chooses: a layer missing, a frame lost, a header without its payload, a
payload of the wrong size, the sender gone half-way, or nothing while its
connection stays open. Every such request ends with an error and no token,
and its blocks are freed; the same stand-in sending every frame gets an
answer (the checks are not vacuous), even when it takes longer than the
transfer timeout while answering heartbeats. Frames naming blocks outside a
request's reservation never land. Over ipc, the blocks of a request aborted
mid-transfer stay held until the transfer timeout passes again or the
prefill is lost. With a real prefill instance, a request aborted
mid-transfer whose id is reused at once by a new request never leaks its
late messages into the new one.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest

from pdlab import LLM, SamplingParams
from pdlab.cluster.client import RemoteEngine, ping
from pdlab.cluster.messages import AbortPrefill, PrefillTask
from pdlab.engine.outputs import RequestOutput
from tests.cluster.fake_prefill import FakePrefill, chunks_of, complete, done, layer_frames, push_all
from tests.margins import STALL_S

from .conftest import instance_args, is_idle, wait_idle

MAX_LEN = 512
BLOCK_SIZE = 16
PROMPT = list(range(3, 43))  # 40 tokens: 3 blocks
PARAMS = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
# The stand-in pair's --transfer-timeout-s: past a stall of the test process (which answers the heartbeats).
TIMEOUT_S = STALL_S


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


def start_decode(cluster, fake: FakePrefill, protocol: str = "tcp", timeout_s: float = TIMEOUT_S):
    """A decode instance whose only prefill is `fake`, with 64 KV blocks."""
    proc = cluster.start("decode", "tiny", instance_args(
        protocol, MAX_LEN, timeout_s, ["--innode-prefill-ports", str(fake.port), "--num-gpu-blocks", "64"]))
    proc.wait_ready(120)
    return proc


@pytest.fixture(scope="module")
def fake_pair(module_cluster):
    fake = FakePrefill()
    yield fake, start_decode(module_cluster, fake)
    fake.close()


def run_one(fake_pair, how: Callable, request_id: str) -> RequestOutput:
    fake, decode_proc = fake_pair
    engine = RemoteEngine(decode_proc.endpoint)
    try:
        engine.add_request(PROMPT, PARAMS, request_id)
        task = fake.next_task()
        assert len(task.dst_block_ids) == 3 and task.request_id.startswith(request_id)
        how(fake, task)
        deadline = time.monotonic() + 20
        outs = {}
        while engine.has_unfinished() and time.monotonic() < deadline:
            outs.update((o.request_id, o) for o in engine.step() if o.finished)
            if how is not cut_half_way:
                fake.answer_pings()
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
    decode_proc = start_decode(cluster, fake)
    start_s = time.monotonic()
    out = run_one((fake, decode_proc), cut_half_way, "cut")
    assert out.finish_reason == "error" and out.token_ids == [] and "KV never arrived" in out.error, out.error
    # Its connection dropped: at once; had that gone unseen, its silence after the transfer timeout.
    assert out.finish_time_s - start_s < TIMEOUT_S + STALL_S, "it should end within the transfer timeout"
    wait_idle({"decode": decode_proc.endpoint}, 10.0, lambda: decode_proc.log_tail(20))


def test_a_prefill_slower_than_the_timeout_that_answers_heartbeats_is_waited_for(fake_pair):
    def slow(fake: FakePrefill, task: PrefillTask) -> None:
        busy_until = time.monotonic() + TIMEOUT_S + 1.0  # past the timeout and the heartbeat check after it
        while time.monotonic() < busy_until:
            fake.answer_pings()
            time.sleep(0.02)
        complete(fake, task)

    out = run_one(fake_pair, slow, "slow")
    assert out.error is None and out.token_ids[0] == 7 and len(out.token_ids) == 8, out.error
    wait_idle({"decode": fake_pair[1].endpoint}, 10.0)


def test_a_prefill_that_hangs_with_its_connection_open_is_given_up_after_the_timeout(cluster):
    timeout_s = 2.0
    fake = FakePrefill()
    try:
        decode_proc = start_decode(cluster, fake, timeout_s=timeout_s)
        fake.answering = False  # it takes the task, then says nothing, its connection open
        engine = RemoteEngine(decode_proc.endpoint)
        try:
            sent_s = time.monotonic()
            engine.add_request(PROMPT, PARAMS, "hung")
            fake.next_task()
            out = engine.drain(timeout_s + STALL_S).get("hung")
        finally:
            engine.close()
        assert out is not None, f"not given up within the timeout\n{decode_proc.log_tail(20)}"
        assert out.finish_reason == "error" and out.token_ids == [], (out.finish_reason, out.error)
        assert f"prefill:{fake.port} stopped answering for {timeout_s:.1f} s" in out.error, out.error
        # Never before the timeout: the decode counts from the dispatch, which came after the request.
        assert out.finish_time_s - sent_s >= timeout_s
        wait_idle({"decode": decode_proc.endpoint}, 10.0, lambda: decode_proc.log_tail(20))
    finally:
        fake.close()


def test_kv_frames_naming_blocks_outside_the_reservation_never_land(fake_pair):
    """Two requests transfer at once over tcp. Frames of the first naming the second's blocks (or free ones)
    are dropped: the second answers exactly as without them, and the first does not count them."""
    fake, decode_proc = fake_pair

    def serve_two(rogue_frames: bool) -> dict[str, RequestOutput]:
        engine = RemoteEngine(decode_proc.endpoint)
        try:
            for request_id in ("a", "b"):
                engine.add_request(PROMPT, PARAMS, request_id)
            tasks = sorted((fake.next_task(), fake.next_task()), key=lambda t: t.request_id)
            a, b = tasks
            assert a.request_id.startswith("a/") and b.request_id.startswith("b/")
            push_all(fake, b, chunks_of(b))
            if rogue_frames:  # other KV (seed 1), under a's transfer id
                free = sorted(set(range(64)) - set(a.dst_block_ids) - set(b.dst_block_ids))[:3]
                for blocks in (b.dst_block_ids, free):
                    for layer in range(a.kv.num_layers):
                        fake.send(a, layer_frames(a, layer, blocks, seed=1))
            done(fake, b, 2 * b.kv.num_layers)
            complete(fake, a)
            return engine.drain(20.0)
        finally:
            engine.close()

    clean, attacked = serve_two(rogue_frames=False), serve_two(rogue_frames=True)
    for outs in (clean, attacked):
        assert {r: (o.error, len(o.token_ids)) for r, o in outs.items()} == {"a": (None, 8), "b": (None, 8)}
    assert attacked["b"].token_ids == clean["b"].token_ids and attacked["a"].token_ids == clean["a"].token_ids
    fake.answer_pings()
    wait_idle({"decode": decode_proc.endpoint}, 10.0)


@pytest.mark.parametrize("released_by", ["the timeout", "the prefill lost"])
def test_ipc_blocks_of_a_request_aborted_mid_transfer_are_held_until_the_timeout_or_the_prefill_is_lost(
        cluster, released_by: str):
    """Over ipc the prefill writes straight into the decode cache: after an abort a write may still land, so
    the blocks stay held until the prefill confirms it stopped (this one never does), the transfer timeout
    passes again, or the prefill is lost (its writes stopped with it)."""
    timeout_s = TIMEOUT_S if released_by == "the timeout" else 60.0
    fake = FakePrefill()
    try:
        decode_proc = start_decode(cluster, fake, "ipc", timeout_s)
        engine = RemoteEngine(decode_proc.endpoint)
        try:
            engine.add_request(PROMPT, PARAMS, "held")
            task = fake.next_task()
            aborted_s = time.monotonic()
            engine.abort("held")
            assert engine.drain(STALL_S)["held"].finish_reason == "abort"
        finally:
            engine.close()
        assert fake.next_other(AbortPrefill).request_id == task.request_id, "the decode asks the prefill to stop"
        pong = ping(decode_proc.endpoint)
        assert (pong.num_held, pong.num_blocks - pong.num_free_blocks) == (1, 3), pong
        lost_s = time.monotonic()
        if released_by == "the prefill lost":
            fake.close()
        deadline = (aborted_s + timeout_s if released_by == "the timeout" else lost_s) + STALL_S
        while not is_idle(pong := ping(decode_proc.endpoint)):
            assert time.monotonic() < deadline, f"still held: {pong}\n{decode_proc.log_tail(20)}"
            if released_by == "the timeout":
                fake.answer_pings()  # alive, only silent about the transfer
            time.sleep(0.02)
        released_s = time.monotonic()
        if released_by == "the timeout":
            assert released_s - aborted_s >= timeout_s, "released before the prefill could have stopped writing"
    finally:
        fake.close()


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
