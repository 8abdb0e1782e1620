"""The dispatch policies shared by the cluster layer, the splitwise router and the simulator."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pdlab.policy.dispatch import (
    POLICIES, FastDeploy, LeastLoaded, PowerOfTwo, RoundRobin, decode_tolerance, instance_load, make_policy,
    prefill_tolerance, select_pd,
)

loads_st = st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1, max_size=12)


@pytest.mark.parametrize("name", sorted(POLICIES))
@given(loads=loads_st, tolerance=st.floats(min_value=0, max_value=1e3))
def test_every_policy_picks_a_valid_index(name, loads, tolerance):
    assert 0 <= make_policy(name, seed=1).pick(loads, tolerance) < len(loads)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_no_candidate_is_an_error(name):
    with pytest.raises(ValueError, match="no instance"):
        make_policy(name).pick([])


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="fastdeploy"):
        make_policy("random")


@given(loads=loads_st, tolerance=st.floats(min_value=0, max_value=1e3), seed=st.integers(0, 2**32))
def test_least_loaded_and_fastdeploy_stay_within_tolerance_of_the_minimum(loads, tolerance, seed):
    for policy in (LeastLoaded(), FastDeploy(seed)):
        for _ in range(5):
            assert loads[policy.pick(loads, tolerance)] <= min(loads) + tolerance


def test_least_loaded_takes_near_ties_in_turn():
    policy = LeastLoaded()
    assert [policy.pick([5, 9, 5.5, 20], tolerance=1) for _ in range(4)] == [0, 2, 0, 2]
    assert [policy.pick([5, 9, 5.5, 20]) for _ in range(3)] == [0, 0, 0]  # no tolerance: the least


def test_fastdeploy_spreads_a_burst_over_near_ties_and_is_seeded():
    loads = [100, 130, 180, 900]
    policy = FastDeploy(seed=3)
    picks = Counter(policy.pick(loads, tolerance=100) for _ in range(3000))
    assert set(picks) == {0, 1, 2} and min(picks.values()) > 800  # uniform among the three near-least
    a, b = FastDeploy(7), FastDeploy(7)
    assert [a.pick(loads, 100) for _ in range(50)] == [b.pick(loads, 100) for _ in range(50)]


def test_round_robin_and_power_of_two():
    rr = RoundRobin()
    assert [rr.pick([9, 0, 0]) for _ in range(4)] == [0, 1, 2, 0]
    p2 = PowerOfTwo(seed=1)
    picks = Counter(p2.pick([0, 10, 20, 30]) for _ in range(2000))
    assert picks[0] > picks[1] > picks[2] > picks[3]  # the least loaded wins every pair it is in


def test_fastdeploys_blur_steps():
    assert prefill_tolerance(50) == 100  # clamped below
    assert prefill_tolerance(600) == 300  # 600 / 2
    assert prefill_tolerance(999) == 499.5
    assert prefill_tolerance(1000) == 100  # 1000 / 10
    assert prefill_tolerance(4000) == 400
    assert prefill_tolerance(100_000) == 500  # clamped above
    assert decode_tolerance(3) == 3 and decode_tolerance(40) == 10


def test_instance_load_counts_tokens_for_prefill_and_mixed_and_requests_for_decode():
    prompts = [100, 20, 7]
    assert instance_load("prefill", prompts) == 127 == instance_load("mixed", prompts)
    assert instance_load("decode", prompts) == 3
    assert instance_load("decode", iter(prompts)) == 3


def test_select_pd_uses_the_token_tolerance_for_prefills():
    prefill_loads, decode_loads = [0, 250, 2000], [3, 0, 9]
    picks = {select_pd(FastDeploy(s), FastDeploy(s + 1), prefill_loads, decode_loads, 600) for s in range(200)}
    assert {p for p, _ in picks} == {0, 1}  # 250 is within 300 tokens of 0; 2000 is not
    assert {d for _, d in picks} == {0, 1}  # within min(3, 10) requests of 0
