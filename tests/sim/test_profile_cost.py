"""ProfileCost: interpolation of a measured step-time table, and the profile CLI feeding it."""

import pytest

from pdlab.policy.request import Request
from pdlab.policy.scheduler import ScheduledBatch, ScheduledRequest, SchedulerConfig
from pdlab.sampling_params import SamplingParams
from pdlab.sim import InstanceSpec, Layout, simulate
from pdlab.sim.profile_cost import ProfileCost
from pdlab.workload.workload import RequestSpec

ROWS = [
    {"phase": "prefill", "num_seqs": 1, "num_tokens": 100, "context_tokens": 100, "step_ms": 10},
    {"phase": "prefill", "num_seqs": 1, "num_tokens": 200, "context_tokens": 200, "step_ms": 20},
    {"phase": "decode", "num_seqs": 1, "num_tokens": 1, "context_tokens": 100, "step_ms": 5},
    {"phase": "decode", "num_seqs": 9, "num_tokens": 9, "context_tokens": 100, "step_ms": 7},
    {"phase": "decode", "num_seqs": 1, "num_tokens": 1, "context_tokens": 300, "step_ms": 6},
    {"phase": "decode", "num_seqs": 9, "num_tokens": 9, "context_tokens": 300, "step_ms": 10},
]


def batch(*items):
    """items: (start, num_tokens) with the request's tokens ending at start + num_tokens."""
    return ScheduledBatch([ScheduledRequest(Request(f"r{i}", [5] * (s + n), SamplingParams()), s, n, True)
                           for i, (s, n) in enumerate(items)])


def test_interpolates_and_extrapolates():
    cost = ProfileCost.from_rows(ROWS)
    assert cost.step_time_s(batch((0, 150))) == pytest.approx(0.015)
    assert cost.step_time_s(batch((0, 400))) == pytest.approx(0.040)  # linear past the end
    assert cost.step_time_s(batch((0, 10))) == pytest.approx(0.010)  # never below the smallest row
    assert cost.step_time_s(batch(*[(99, 1)] * 5)) == pytest.approx(0.006)  # context 100, 5 seqs
    assert cost.step_time_s(batch(*[(199, 1)] * 5)) == pytest.approx(0.007)  # between contexts 100 and 300
    mixed = cost.step_time_s(batch((0, 150), (99, 1)))
    assert mixed == pytest.approx(max(0.0151, 0.005))


def test_profile_cli_table_drives_the_simulator(tmp_path):
    from pdlab.profile import main

    out = tmp_path / "tiny.csv"
    assert main(["--model", "tiny", "--device", "cpu", "--prefill-tokens", "8,32", "--decode-batches", "1,4",
                 "--decode-contexts", "16,32", "--repeats", "1", "--out", str(out)]) == 0
    cost = ProfileCost.from_csv(out)
    assert len(cost.prefill) == 2 and len(cost.decode) == 2
    layout = Layout(InstanceSpec(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128), 64))
    records = simulate([RequestSpec(f"r{i}", 0.0, (100,) * 20, 8) for i in range(4)], layout, cost)
    assert all(r.ok and r.ttft_s > 0 for r in records)
