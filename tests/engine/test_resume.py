"""A request resumed with the tokens it already has (after the instance serving it failed) goes on as if
nothing had happened: the same tokens, greedy or seeded, and the known ones count towards max_tokens."""

from __future__ import annotations

import random

import pytest

from pdlab import LLM, SamplingParams
from pdlab.errors import InvalidRequestError


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("tiny", device="cpu", num_blocks=256, block_size=4, max_num_batched_tokens=32, max_model_len=256)


def run(llm: LLM, prompt: list[int], params: SamplingParams, known: list[int]) -> list[int]:
    engine = llm.engine
    request = engine.make_request(prompt, params, f"resume-{len(known)}-{random.random()}", seed=params.seed or 5,
                                  output_token_ids=known)
    engine.scheduler.add(request)
    while engine.has_unfinished():
        engine.step()
    return request.output_token_ids


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_a_resumed_request_continues_with_the_same_tokens(llm: LLM, kind: str):
    rng = random.Random(1)
    for n in (1, 5, 40):
        prompt = [rng.randrange(3, 512) for _ in range(n)]
        params = (SamplingParams(max_tokens=20, temperature=0, ignore_eos=True) if kind == "greedy" else
                  SamplingParams(max_tokens=20, temperature=0.9, top_k=50, seed=77, ignore_eos=True))
        want = run(llm, prompt, params, [])
        assert len(want) == 20
        for k in (1, 7, 19):
            assert run(llm, prompt, params, want[:k]) == want, (n, k)
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_nothing_left_to_generate_is_an_invalid_request(llm: LLM):
    with pytest.raises(InvalidRequestError, match="nothing is left"):
        llm.engine.make_request([5, 6], SamplingParams(max_tokens=3), output_token_ids=[1, 2, 3])
    with pytest.raises(InvalidRequestError, match="output token ids"):
        llm.engine.make_request([5, 6], SamplingParams(max_tokens=3), output_token_ids=[10**9])
