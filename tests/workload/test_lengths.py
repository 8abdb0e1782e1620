import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdlab.errors import ConfigError
from pdlab.workload.lengths import EmpiricalLength, FixedLength, LognormalLength, UniformLength


@settings(max_examples=50, deadline=None)
@given(lo=st.integers(1, 1000), width=st.integers(0, 1000), seed=st.integers(0, 2**32 - 1))
def test_uniform_stays_within_both_ends(lo, width, seed):
    values = UniformLength(lo, lo + width).sample(500, np.random.default_rng(seed))
    assert values.dtype == np.int64
    assert values.min() >= lo and values.max() <= lo + width


def test_uniform_reaches_both_ends():
    values = UniformLength(16, 48).sample(10_000, np.random.default_rng(0))
    assert values.min() == 16 and values.max() == 48


@settings(max_examples=50, deadline=None)
@given(
    median=st.floats(0.5, 1e5),
    sigma=st.floats(0, 4),
    lo=st.integers(1, 50),
    cap=st.one_of(st.none(), st.integers(50, 10_000)),
    seed=st.integers(0, 2**32 - 1),
)
def test_lognormal_stays_within_bounds(median, sigma, lo, cap, seed):
    values = LognormalLength(median, sigma, lo, cap).sample(500, np.random.default_rng(seed))
    assert values.dtype == np.int64
    assert values.min() >= lo
    if cap is not None:
        assert values.max() <= cap


def test_lognormal_parameterizations_agree():
    n, rng = 200_000, np.random.default_rng
    by_median = LognormalLength(64, 0.6).sample(n, rng(1))
    assert np.median(by_median) == pytest.approx(64, rel=0.02)
    assert np.percentile(by_median, 90) == pytest.approx(64 * math.exp(1.2816 * 0.6), rel=0.03)

    by_mean = LognormalLength.from_mean(200, 0.5).sample(n, rng(2))
    assert by_mean.mean() == pytest.approx(200, rel=0.02)

    by_p90 = LognormalLength.from_p90(1020, 2734).sample(n, rng(3))  # the Azure conversation trace's prompts
    assert np.median(by_p90) == pytest.approx(1020, rel=0.02)
    assert np.percentile(by_p90, 90) == pytest.approx(2734, rel=0.03)


def test_lognormal_cap_piles_the_tail_on_the_cap():
    values = LognormalLength(64, 1.0, min_tokens=8, max_tokens=100).sample(10_000, np.random.default_rng(0))
    assert values.max() == 100 and values.min() == 8
    assert (values == 100).mean() > 0.2  # P(X > 100) is about 0.33


def test_fixed():
    np.testing.assert_array_equal(FixedLength(7).sample(3, None), [7, 7, 7])
    assert FixedLength(7).max_value == 7


@pytest.mark.parametrize(
    "make",
    [
        lambda: FixedLength(0),
        lambda: UniformLength(0, 3),
        lambda: UniformLength(5, 4),
        lambda: LognormalLength(-1, 1),
        lambda: LognormalLength(10, 1, max_tokens=0),
        lambda: LognormalLength.from_p90(10, 5),
        lambda: EmpiricalLength(()),
    ],
)
def test_bad_parameters_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_empirical_draws_only_observed_values_clipped():
    dist = EmpiricalLength((3, 10, 500), max_tokens=100)
    values = dist.sample(1000, np.random.default_rng(0))
    assert set(values.tolist()) == {3, 10, 100}
    assert dist.max_value == 100
    np.testing.assert_array_equal(values, dist.sample(1000, np.random.default_rng(0)))


def test_empirical_replay_takes_rows_in_order():
    dist = EmpiricalLength((5, 0, 9, 2), replay=True)
    np.testing.assert_array_equal(dist.sample(3), [5, 1, 9])  # 0 tokens becomes the minimum, 1
    with pytest.raises(ConfigError, match="4 rows, fewer than the 5"):
        dist.sample(5)
