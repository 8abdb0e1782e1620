import math

import pytest
import torch

from pdlab.engine.sampler import _filter, sample
from pdlab.errors import InvalidRequestError
from pdlab.sampling_params import SamplingParams


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]])
    assert sample(logits, [SamplingParams(temperature=0)] * 2, [1, 2], [0, 0]) == [1, 0]


def test_same_seed_and_index_give_the_same_token_whatever_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    p = SamplingParams(temperature=1.0)
    alone = sample(logits[2:3], [p], [42], [7])
    batched = sample(logits, [p] * 4, [1, 2, 42, 3], [0, 0, 7, 0])
    assert batched[2] == alone[0]
    other_index = [sample(logits[2:3], [p], [42], [i])[0] for i in range(20)]
    assert len(set(other_index)) > 1, "different output positions must draw differently"


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log()[None, :]
    p = SamplingParams(temperature=1.0)
    counts = torch.zeros(3)
    n = 3000
    for i in range(n):
        counts[sample(logits, [p], [123], [i])[0]] += 1
    assert torch.allclose(counts / n, probs, atol=0.03)


def test_top_k_and_top_p_keep_exactly_the_expected_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    kept = lambda **kw: torch.isfinite(_filter(logits.clone(), [SamplingParams(**kw)])[0]).nonzero().flatten().tolist()
    assert kept(top_k=2) == [0, 1]
    assert kept(top_k=0) == [0, 1, 2, 3, 4]
    probs = torch.softmax(logits[0], -1).tolist()  # ~[0.64, 0.24, 0.09, 0.03, 0.01]
    assert kept(top_p=0.5) == [0]
    assert kept(top_p=probs[0] + 0.01) == [0, 1]
    assert kept(top_p=1.0) == [0, 1, 2, 3, 4]
    assert kept(top_k=3, top_p=0.99) == [0, 1, 2]
    assert math.isclose(sum(probs), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(top_k=-1), "top_k"),
        (dict(stop=[""]), "stop"),
        (dict(seed="x"), "seed"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**kwargs)
