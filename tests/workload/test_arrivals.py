import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdlab.errors import ConfigError
from pdlab.workload.arrivals import BurstArrivals, ConstantArrivals, GammaArrivals, PoissonArrivals, TraceArrivals

PROCESSES = [
    PoissonArrivals(4.0),
    GammaArrivals(4.0, cv=3.0),
    GammaArrivals(4.0, cv=0.5),
    ConstantArrivals(4.0),
    BurstArrivals(),
]


def gaps_cv(times: np.ndarray) -> float:
    gaps = np.diff(times)
    return gaps.std() / gaps.mean()


@pytest.mark.parametrize("process", PROCESSES, ids=repr)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 300))
def test_same_seed_same_times_sorted_from_zero(process, seed, n):
    a = process.sample(n, np.random.default_rng(seed))
    b = process.sample(n, np.random.default_rng(seed))
    assert a.shape == (n,) and a.dtype == np.float64
    np.testing.assert_array_equal(a, b)
    if n:
        assert a[0] == 0.0
        assert (np.diff(a) >= 0).all()


def test_different_seeds_give_different_times():
    a = PoissonArrivals(4.0).sample(100, np.random.default_rng(0))
    b = PoissonArrivals(4.0).sample(100, np.random.default_rng(1))
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("rate_rps", [0.5, 4.0, 100.0])
def test_poisson_mean_rate_and_cv(rate_rps):
    n = 200_000
    times = PoissonArrivals(rate_rps).sample(n, np.random.default_rng(7))
    assert (n - 1) / times[-1] == pytest.approx(rate_rps, rel=0.02)
    assert gaps_cv(times) == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_gamma_has_the_asked_rate_and_burstiness(cv):
    n = 200_000
    times = GammaArrivals(2.0, cv).sample(n, np.random.default_rng(3))
    assert (n - 1) / times[-1] == pytest.approx(2.0, rel=0.03)
    assert gaps_cv(times) == pytest.approx(cv, rel=0.05)


def test_constant_and_burst_are_exact():
    np.testing.assert_array_equal(ConstantArrivals(4.0).sample(5, None), [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(BurstArrivals().sample(3, None), [0.0, 0.0, 0.0])


@pytest.mark.parametrize("make", [lambda: PoissonArrivals(0.0), lambda: ConstantArrivals(-1.0)])
def test_non_positive_rate_is_refused(make):
    with pytest.raises(ValueError, match="rate_rps"):
        make().sample(3, np.random.default_rng(0))


def test_gamma_refuses_non_positive_cv():
    with pytest.raises(ValueError, match="cv"):
        GammaArrivals(1.0, cv=0.0)


def test_trace_replay_keeps_times_or_rescales_to_the_rate():
    trace = TraceArrivals((10.0, 11.0, 11.5, 14.0, 20.0))
    np.testing.assert_array_equal(trace.sample(4), [0.0, 1.0, 1.5, 4.0])
    # 4 requests over 4 s is 0.75 req/s; at 3 req/s the same shape lasts 1 s.
    scaled = TraceArrivals(trace.times_s, rate_rps=3.0).sample(4)
    np.testing.assert_allclose(scaled, [0.0, 0.25, 0.375, 1.0])
    assert 3 / scaled[-1] == pytest.approx(3.0)


def test_trace_replay_sorts_and_refuses_too_many_requests():
    np.testing.assert_array_equal(TraceArrivals((3.0, 1.0, 2.0)).sample(2), [0.0, 1.0])
    with pytest.raises(ConfigError, match="3 arrivals, fewer than the 4"):
        TraceArrivals((0.0, 1.0, 2.0)).sample(4)
