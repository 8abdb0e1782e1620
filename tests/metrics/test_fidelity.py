"""The fidelity table: relative errors of simulated metrics against real ones."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from pdlab.experiment import parse_experiment
from pdlab.fidelity import replay_pairs
from pdlab.metrics.fidelity import fidelity_table
from pdlab.metrics.records import RequestRecord
from pdlab.run import ExperimentResult, run_experiment


def records(scale: float) -> list[RequestRecord]:
    out = []
    for i in range(20):
        first = i * 0.1 + 0.05 * scale
        times = tuple(first + k * 0.01 * scale for k in range(5))
        out.append(RequestRecord(f"r{i}", "real", "colocated", i * 0.1, first, times[-1], 10, 5, "length", times))
    return out


def test_a_slower_simulation_shows_as_positive_errors():
    table = fidelity_table({"x": (records(1.0), records(1.1))}).set_index("metric")
    assert abs(table.loc["ttft_p50_ms", "error"] - 0.1) < 1e-9
    assert abs(table.loc["tpot_p90_ms", "error"] - 0.1) < 1e-9
    assert not table.loc["ttft_p50_ms", "within_target"]
    same = fidelity_table({"x": (records(1.0), records(1.0))}).set_index("metric")
    assert pd.isna(same.loc["goodput_rps", "error"])  # no SLO given: no goodput to compare
    judged = same.drop(index="goodput_rps")
    assert (judged["error"].abs() < 1e-12).all() and judged["within_target"].all()


def test_replay_pairs_replays_the_recorded_request_list_of_a_real_only_result(tmp_path):
    """A result whose runs were recorded real-only (a GPU run under data/results/) is paired with the simulator's
    replay of the same requests; a record list that is not the experiment's is refused."""
    exp = parse_experiment({
        "name": "replay", "seed": 1, "model": {"name": "llama3-8b"}, "engine": {"max_num_seqs": 16},
        "workload": {"num_requests": 30, "arrival": {"kind": "poisson", "rate_rps": 4},
                     "prompt_len": {"kind": "uniform", "min_tokens": 16, "max_tokens": 256},
                     "output_len": {"kind": "uniform", "min_tokens": 4, "max_tokens": 32}},
        "runs": [{"name": "c", "backend": "sim"}], "sweep": {"rates_rps": [2, 8]}, "output_dir": str(tmp_path)})
    simulated = run_experiment(exp, progress=False, write=False)
    # Stand-ins for real records: the simulator's own, so the replay must give errors of zero.
    as_real = {label: dataclasses.replace(r, backend="real") for label, r in simulated.runs.items()}
    pairs = replay_pairs(ExperimentResult(exp, as_real, None))
    assert sorted(pairs) == ["c@2", "c@8"]
    table = fidelity_table(pairs)
    assert table["error"].abs().max() == 0
    as_real["c@2"] = dataclasses.replace(as_real["c@2"], records=as_real["c@2"].records[1:])
    with pytest.raises(ValueError, match="c@2: the simulator's request list differs"):
        replay_pairs(ExperimentResult(exp, as_real, None))
