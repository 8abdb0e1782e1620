from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdlab.workload import (
    BurstArrivals,
    FixedLength,
    GammaArrivals,
    LognormalLength,
    PoissonArrivals,
    UniformLength,
    WorkloadSpec,
    make_workload,
)

VOCAB = 49_152
SPEC = WorkloadSpec(
    num_requests=40,
    arrivals=PoissonArrivals(4.0),
    prompt_len=LognormalLength(64, 0.6, min_tokens=8, max_tokens=256),
    output_len=UniformLength(16, 48),
)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**63 - 1))
def test_same_seed_same_requests(seed):
    assert make_workload(SPEC, VOCAB, seed) == make_workload(SPEC, VOCAB, seed)


def test_different_seeds_differ():
    assert make_workload(SPEC, VOCAB, 0) != make_workload(SPEC, VOCAB, 1)


def test_requests_have_exact_lengths_safe_ids_and_sorted_arrivals():
    requests = make_workload(SPEC, VOCAB, 0)
    assert len(requests) == 40
    assert len({r.request_id for r in requests}) == 40
    arrivals = [r.arrival_s for r in requests]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0.0
    for r in requests:
        assert 8 <= r.num_prompt_tokens <= 256 and r.num_prompt_tokens == len(r.prompt_token_ids)
        assert 16 <= r.max_tokens <= 48
        assert min(r.prompt_token_ids) >= 100 and max(r.prompt_token_ids) < VOCAB
        assert r.prompt_text is None
        assert all(type(t) is int for t in r.prompt_token_ids)


def test_each_stream_is_independent_of_the_others():
    base = make_workload(SPEC, VOCAB, 5)
    other_outputs = make_workload(replace(SPEC, output_len=FixedLength(3)), VOCAB, 5)
    assert [r.arrival_s for r in base] == [r.arrival_s for r in other_outputs]
    assert [r.prompt_token_ids for r in base] == [r.prompt_token_ids for r in other_outputs]
    other_arrivals = make_workload(replace(SPEC, arrivals=GammaArrivals(1.0, 4.0)), VOCAB, 5)
    assert [(r.prompt_token_ids, r.max_tokens) for r in base] == [
        (r.prompt_token_ids, r.max_tokens) for r in other_arrivals
    ]


def test_text_prompts_need_an_encoder():
    spec = replace(SPEC, text_prompts=("What is the capital of France?", "Hi"))

    def encode(text: str) -> list[int]:
        return [1, *(ord(c) for c in text), 2]

    requests = make_workload(spec, VOCAB, 0, encode_prompt=encode)
    assert requests[0].prompt_text == "What is the capital of France?"
    assert requests[0].prompt_token_ids == tuple(encode("What is the capital of France?"))
    assert requests[1].prompt_token_ids == (1, 72, 105, 2)
    assert requests[2].prompt_text is None
    # The rest of the workload is what it would be without the texts.
    plain = make_workload(SPEC, VOCAB, 0)
    assert requests[2:] == plain[2:]
    assert [r.max_tokens for r in requests] == [r.max_tokens for r in plain]
    # Without an encoder (the simulator) every request is synthetic.
    assert make_workload(spec, VOCAB, 0) == plain


def test_small_vocab_and_empty_workload():
    tiny = WorkloadSpec(3, BurstArrivals(), FixedLength(50), FixedLength(1))
    requests = make_workload(tiny, 105, 0)
    assert {t for r in requests for t in r.prompt_token_ids} <= set(range(100, 105))
    assert make_workload(replace(tiny, num_requests=0), 105, 0) == []
    with pytest.raises(ValueError, match="vocab_size"):
        make_workload(tiny, 100, 0)


def test_max_request_tokens():
    assert SPEC.max_request_tokens == 256 + 48
    assert replace(SPEC, prompt_len=LognormalLength(64, 0.6)).max_request_tokens is None


def test_mean_prompt_length_follows_the_distribution():
    spec = replace(SPEC, num_requests=5000)
    lengths = np.array([r.num_prompt_tokens for r in make_workload(spec, VOCAB, 0)])
    assert np.median(lengths) == pytest.approx(64, rel=0.05)
