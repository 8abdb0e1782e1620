"""The simulator's async scheduling (a colocated instance), planned by the scheduler's own `schedule_after`: a
request arriving during step n starts in step n + 2, and without arrivals the steps are the synchronous ones."""

import pytest

from pdlab.policy.scheduler import SchedulerConfig
from pdlab.sim import FixedCost, InstanceSpec, Layout, simulate
from pdlab.workload.workload import RequestSpec

STEP = 0.010


def layout(async_scheduling: bool) -> Layout:
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256)
    return Layout(InstanceSpec(config, num_blocks=256, block_size=16, async_scheduling=async_scheduling))


def test_a_request_arriving_during_a_step_starts_two_steps_later():
    # "a" decodes from t=0 in steps of 10 ms; "b" arrives 3 ms into step 2 (which runs from 20 to 30 ms).
    requests = [RequestSpec("a", 0.0, (100,) * 8, 20), RequestSpec("b", 0.023, (100,) * 8, 4)]
    sync = {r.request_id: r for r in simulate(requests, layout(False), FixedCost(STEP), seed=0)}
    ahead = {r.request_id: r for r in simulate(requests, layout(True), FixedCost(STEP), seed=0)}
    assert sync["b"].first_token_s == pytest.approx(0.040)  # step 3, the next one
    assert ahead["b"].first_token_s == pytest.approx(0.050)  # step 4: step 3 was planned while step 2 ran
    assert ahead["a"].token_times_s == pytest.approx(sync["a"].token_times_s)  # "a" never waits


def test_without_arrivals_mid_run_async_and_synchronous_steps_are_the_same():
    requests = [RequestSpec(f"r{i}", 0.0, (100,) * (10 + 7 * i), 5 + 3 * i) for i in range(6)]
    sync = simulate(requests, layout(False), FixedCost(STEP), seed=0)
    ahead = simulate(requests, layout(True), FixedCost(STEP), seed=0)
    def times(records):
        return {r.request_id: [round(t, 9) for t in r.token_times_s] for r in records}

    assert times(ahead) == times(sync)
