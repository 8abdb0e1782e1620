"""The engine on a tiny random-weight preset: continuity under preemption, aborts, stops, bad requests."""

from __future__ import annotations

import random

import pytest

from pdlab import LLM, SamplingParams
from pdlab.errors import InvalidRequestError, ModelNotFoundError


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 512) for _ in range(rng.randrange(1, 60))] for _ in range(n)]


@pytest.fixture(scope="module")
def roomy():
    return LLM("tiny", device="cpu", num_blocks=512, block_size=4, max_num_batched_tokens=64, max_model_len=256)


def test_preemption_and_chunking_change_nothing_but_the_schedule(roomy):
    # A cache so small that requests are preempted and recomputed, against a roomy one.
    tight = LLM("tiny", device="cpu", num_blocks=70, block_size=4, max_num_batched_tokens=16, max_model_len=256)
    ps = prompts(12)
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    seeded = [SamplingParams(max_tokens=24, temperature=0.9, top_p=0.9, top_k=50, seed=i, ignore_eos=True) for i in range(12)]
    for params in (greedy, seeded):
        want = [o.token_ids for o in roomy.generate(ps, params)]
        outs = tight.generate(ps, params)
        assert [o.token_ids for o in outs] == want
    assert sum(o.num_preemptions for o in outs) > 0, "the tight cache should have forced preemption"
    bm = tight.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_seeded_sampling_is_the_same_alone_and_batched(roomy):
    ps = prompts(6, seed=1)
    params = [SamplingParams(max_tokens=10, temperature=1.0, seed=100 + i) for i in range(6)]
    batched = [o.token_ids for o in roomy.generate(ps, params)]
    alone = [roomy.generate(p, sp)[0].token_ids for p, sp in zip(ps, params)]
    assert batched == alone
    unseeded = [o.token_ids for o in roomy.generate(ps, SamplingParams(max_tokens=10))]
    assert unseeded != batched


def test_timestamps_are_ordered(roomy):
    out = roomy.generate(prompts(1)[0], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert out.arrival_time_s <= out.first_token_time_s == out.token_times_s[0] <= out.finish_time_s
    assert out.token_times_s == sorted(out.token_times_s) and len(out.token_times_s) == 5
    assert out.ttft_s >= 0 and out.tpot_s >= 0 and len(out.itl_s) == 4


def test_abort_frees_blocks_at_any_point(roomy):
    engine = roomy.engine
    for steps_before_abort in (0, 1, 3):
        ids = [engine.add_request(p, SamplingParams(max_tokens=50, ignore_eos=True)).request_id for p in prompts(4, seed=steps_before_abort)]
        for _ in range(steps_before_abort):
            engine.step()
        for rid in ids:
            out = engine.abort(rid)
            assert out.finished and out.finish_reason == "abort"
        assert not engine.has_unfinished()
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.abort("no-such-request") is None


def test_stop_token_ids_and_stop_strings(roomy):
    p = prompts(1, seed=3)[0]
    free = roomy.generate(p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    stop_at = free.token_ids[5]
    out = roomy.generate(p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop_token_ids=[stop_at]))[0]
    first = free.token_ids.index(stop_at)
    assert out.token_ids == free.token_ids[: first + 1] and out.finish_reason == "stop"
    # A stop string: the tiny preset's byte tokenizer decodes to some text; stop on a piece of it.
    text = roomy.tokenizer.decode(free.token_ids)
    piece = next((text[i:i + 2] for i in range(2, len(text) - 2) if text[i:i + 2].strip()), None)
    if piece is not None:
        out = roomy.generate(p, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[piece]))[0]
        assert out.finish_reason == "stop" and piece not in out.text and text.startswith(out.text)


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], SamplingParams(), "the prompt is empty"),
        ([5] * 300, SamplingParams(), "the prompt has 300 tokens; this model's context (max_model_len) is 256"),
        ([5, 99999], SamplingParams(), "prompt token ids must be integers in [0, 512)"),
    ],
)
def test_bad_requests_are_refused_and_the_engine_keeps_serving(roomy, prompt, params, message):
    with pytest.raises(InvalidRequestError) as info:
        roomy.generate([prompt], params)
    assert message in str(info.value)
    assert not roomy.engine.has_unfinished()
    assert roomy.generate([5, 6, 7], SamplingParams(max_tokens=2))[0].finished


def test_a_bad_prompt_in_a_batch_adds_none_of_it(roomy):
    with pytest.raises(InvalidRequestError):
        roomy.generate([[5, 6], [7] * 300], SamplingParams(max_tokens=2))
    assert not roomy.engine.has_unfinished()
    assert roomy.engine.block_manager.num_free_blocks == roomy.engine.block_manager.num_blocks


def test_unknown_model_names_the_accepted_forms():
    with pytest.raises(ModelNotFoundError) as info:
        LLM("llama-17b-imaginary")
    assert "llama3-8b" in str(info.value) and ".gguf" in str(info.value)


@pytest.mark.parametrize("preset", ["tiny-llama3", "tiny-qwen2", "tiny-qwen3"])
def test_every_tiny_preset_generates(preset):
    llm = LLM(preset, device="cpu", num_blocks=64, max_model_len=128)
    outs = llm.generate(prompts(3), SamplingParams(max_tokens=4, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [4, 4, 4]
