"""ServedCost: the engine's step plus a measured per-step overhead of the served instance."""

import pytest

from pdlab.policy.scheduler import SchedulerConfig
from pdlab.sim import FixedCost, InstanceSpec, Layout, simulate
from pdlab.sim.cost import ServedCost
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
