"""ServedCost: the engine's step plus a measured per-step overhead of the served instance, one figure or a table
by the step's size."""

from types import SimpleNamespace

import pytest

from pdlab.policy.scheduler import SchedulerConfig
from pdlab.sim import FixedCost, InstanceSpec, Layout, simulate
from pdlab.sim.cost import ServedCost, format_overhead_ms, overhead_seconds, parse_overhead_ms
from pdlab.workload.workload import RequestSpec


def test_every_step_takes_the_overhead_more():
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=256)
    requests = [RequestSpec(f"r{i}", 0.0, (5,) * 10, 11) for i in range(4)]
    base = simulate(requests, Layout(InstanceSpec(config, 256)), FixedCost(0.010))
    served = simulate(requests, Layout(InstanceSpec(config, 256)), ServedCost(FixedCost(0.010), 0.004))
    assert all(r.tpot_s == pytest.approx(0.010) for r in base)
    assert all(r.tpot_s == pytest.approx(0.014) for r in served)
    with pytest.raises(ValueError, match="overhead_s"):
        ServedCost(FixedCost(0.01), -0.001)


def test_a_table_of_overheads_is_interpolated_by_the_steps_size_and_held_beyond_its_ends():
    served = ServedCost(FixedCost(0.010), ((2, 0.001), (10, 0.005), (20, 0.003)))
    host = {n: served.host_time_s(SimpleNamespace(items=[None] * n)) for n in (1, 2, 6, 10, 15, 20, 64)}
    assert host == pytest.approx({1: 0.001, 2: 0.001, 6: 0.003, 10: 0.005, 15: 0.004, 20: 0.003, 64: 0.003})
    assert served.step_time_s(SimpleNamespace(items=[None] * 6)) == pytest.approx(0.013)
    for bad in ((), ((0, 0.001),), ((1, -0.001),), ((4, 0.001), (4, 0.002))):
        with pytest.raises(ValueError, match="overhead_s"):
            ServedCost(FixedCost(0.01), bad)


def test_a_table_reaches_the_simulated_tpot():
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256)
    table = overhead_seconds({1: 0.0, 8: 7.0})  # ms: 1 ms more per request beyond the first
    for n in (1, 4, 8):
        requests = [RequestSpec(f"r{i}", 0.0, (5,) * 4, 21) for i in range(n)]
        records = simulate(requests, Layout(InstanceSpec(config, 256)), ServedCost(FixedCost(0.010), table))
        assert all(r.tpot_s == pytest.approx(0.010 + 0.001 * (n - 1)) for r in records)


@pytest.mark.parametrize("text,want", [("3.6", 3.6), ("1:0,16:3.2", {1: 0.0, 16: 3.2}), ("0", 0.0)])
def test_overheads_on_the_command_line(text, want):
    assert parse_overhead_ms(text) == want
    assert parse_overhead_ms(format_overhead_ms(want)) == want


@pytest.mark.parametrize("text", ["fast", "1:", "1:0,x:2"])
def test_a_malformed_overhead_names_itself(text):
    with pytest.raises(ValueError, match="batch:ms"):
        parse_overhead_ms(text)
