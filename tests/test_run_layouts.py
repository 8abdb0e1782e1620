"""`pdlab.run`'s layouts (replicas, xPyD, per-phase TP), rate sweeps and real + sim side by side."""

from __future__ import annotations

import pandas as pd
import pytest

from pdlab.loadgen.balance import Balanced
from pdlab.errors import ConfigError
from pdlab.experiment import parse_experiment
from pdlab.run import run_experiment

TINY = {
    "name": "layouts", "seed": 1, "model": {"name": "tiny", "device": "cpu"},
    "engine": {"max_num_seqs": 8, "max_num_batched_tokens": 64, "max_model_len": 256},
    "workload": {"num_requests": 8, "arrival": {"kind": "poisson", "rate_rps": 30},
                 "prompt_len": {"kind": "uniform", "min_tokens": 4, "max_tokens": 40},
                 "output_len": {"kind": "uniform", "min_tokens": 4, "max_tokens": 12}},
    "sampling": {"temperature": 0},
    "slo": {"ttft_ms": 2000, "tpot_ms": 500},
}


def experiment(tmp_path, **changes) -> object:
    return parse_experiment({**TINY, "output_dir": str(tmp_path), **changes})


def test_a_sweep_in_the_simulator_runs_every_layout_at_every_rate(tmp_path):
    exp = experiment(tmp_path, model={"name": "llama3-8b"}, engine={"max_num_seqs": 32, "max_model_len": 2048},
                     workload={**TINY["workload"], "num_requests": 200},
                     runs=[{"name": "two-colocated", "num_instances": 2, "backend": "sim"},
                           {"name": "2p1d", "mode": "disaggregated", "num_prefill": 2, "backend": "sim"},
                           {"name": "1p1d-tp", "mode": "disaggregated", "prefill_tp": 2, "decode_tp": 1,
                            "backend": "sim"}],
                     sweep={"rates_rps": [1, 4, 16]})
    result = run_experiment(exp, progress=False)
    assert sorted(result.runs) == sorted(f"{r}@{rate}" for r in ("two-colocated", "2p1d", "1p1d-tp") for rate in (1, 4, 16))
    sweep = pd.read_csv(result.out_dir / "sweep.csv")
    assert len(sweep) == 9 and set(sweep["backend"]) == {"sim"}
    light = sweep[sweep["rate_rps"] == 1]
    # At 1 req/s an 8B model on H100s keeps up: throughput is the offered rate (a Poisson sample of 200).
    assert ((light["request_throughput_rps"] - 1).abs() < 0.3).all(), light
    assert (result.out_dir / "sweep.png").stat().st_size > 0 and (result.out_dir / "sweep.svg").stat().st_size > 0
    records = pd.read_csv(result.out_dir / "records.csv")
    assert len(records) == 9 * 200 and set(records["rate_rps"]) == {1, 4, 16}


@pytest.mark.slow
def test_real_and_simulated_side_by_side_on_two_replicas_and_on_2p1d(tmp_path):
    exp = experiment(tmp_path, runs=[{"name": "replicas", "num_instances": 2, "backend": "both"},
                                     {"name": "2p1d", "mode": "disaggregated", "num_prefill": 2,
                                      "transfer_protocol": "tcp"}])
    result = run_experiment(exp, progress=False)
    assert sorted(result.runs) == ["2p1d", "replicas", "replicas@sim"]
    for label, run in result.runs.items():
        assert len(run.records) == 8 and all(r.ok for r in run.records), label
    assert {r.backend for r in result.runs["replicas@sim"].records} == {"sim"}
    table = result.table
    assert list(table.columns) == list(result.runs)


@pytest.mark.parametrize("run, message", [
    ({"name": "x", "prefill_tp": 2}, "only for mode: disaggregated"),
    ({"name": "x", "mode": "disaggregated", "num_instances": 2}, "num_instances and tensor_parallel_size are for"),
    ({"name": "x", "mode": "disaggregated", "prefill_tp": 2, "decode_tp": 1}, "needs prefill_tp == decode_tp"),
])
def test_layouts_that_cannot_run_are_refused_naming_the_field(tmp_path, run, message):
    with pytest.raises(ConfigError, match=message):
        experiment(tmp_path, runs=[run])


def test_a_sweep_needs_an_arrival_rate(tmp_path):
    with pytest.raises(ConfigError, match="sweep.rates_rps needs an arrival with a rate"):
        experiment(tmp_path, workload={**TINY["workload"], "arrival": {"kind": "burst"}}, sweep={"rates_rps": [1]})


class FakeEngine:
    def __init__(self):
        self.pending, self.clock = {}, lambda: 0.0
        self.poll_s = 0.002

    def add_request(self, prompt, params, request_id=None, arrival_time_s=None):
        self.pending[request_id] = prompt
        return request_id


def test_balanced_sends_each_request_to_the_least_loaded_entry_point():
    import zmq

    ctx = zmq.Context.instance()
    engines = [FakeEngine(), FakeEngine(), FakeEngine()]
    for e in engines:  # Balanced polls the engines' client sockets
        e.client = type("C", (), {"sock": ctx.socket(zmq.DEALER)})()
    balanced = Balanced(engines)
    engines[0].pending = {"old-1": [], "old-2": []}
    for i in range(7):
        balanced.add_request([1], None, f"r{i}")
    assert [len(e.pending) for e in engines] == [3, 3, 3]
    assert balanced.num_sent == [1, 3, 3]
    for e in engines:
        e.client.sock.close()


@pytest.mark.slow
def test_a_real_sweep_serves_every_rate_on_one_deployment(tmp_path):
    exp = experiment(tmp_path, runs=[{"name": "one"}], sweep={"rates_rps": [20, 60]})
    result = run_experiment(exp, progress=False)
    assert sorted(result.runs) == ["one@20", "one@60"]
    assert all(r.ok for run in result.runs.values() for r in run.records)
    assert len(list((result.out_dir / "logs").glob("mixed-*.log"))) == 1, "one instance for both rates"


def test_a_simulated_run_takes_its_step_times_from_a_profile_table(tmp_path):
    from pdlab.profiler import write_profile

    rows = [{"phase": "prefill", "num_seqs": 1, "num_tokens": n, "context_tokens": n, "step_ms": 5 + n / 100}
            for n in (16, 256, 1024)]
    rows += [{"phase": "decode", "num_seqs": b, "num_tokens": b, "context_tokens": c, "step_ms": 10.0 + b / 8}
             for b in (1, 8, 32) for c in (128, 1024)]
    table = write_profile(rows, tmp_path / "table.csv")
    base = dict(model={"name": "llama3-8b"}, engine={"max_num_seqs": 32, "max_model_len": 2048})
    slow = run_experiment(experiment(tmp_path, **base, runs=[{"name": "p", "backend": "sim", "profile": str(table)}]),
                          progress=False, write=False)
    fast = run_experiment(experiment(tmp_path, **base, runs=[{"name": "p", "backend": "sim"}]), progress=False,
                          write=False)
    # Every decode step of the table takes >= 10 ms; the roofline's 8B decode step on an H100 takes ~6 ms.
    assert slow.runs["p"].summary["tpot_p50_ms"] >= 10 > fast.runs["p"].summary["tpot_p50_ms"]
    missing = run_experiment(experiment(tmp_path, **base, runs=[{"name": "p", "backend": "sim",
                                                                 "profile": str(tmp_path / "none.csv")}]), write=False)
    assert not missing.runs and "profile" in missing.failures["p"] and "none.csv" in missing.failures["p"]


def test_overrides_index_lists():
    from pdlab.yaml_config import apply_overrides

    data = {"runs": [{"name": "a"}, {"name": "b", "prefill_tp": 4}], "sweep": {"rates_rps": [1, 2]}}
    apply_overrides(data, ["runs.1.prefill_tp=1", "sweep.rates_rps.0=0.5"])
    assert data["runs"][1]["prefill_tp"] == 1 and data["sweep"]["rates_rps"] == [0.5, 2]
    with pytest.raises(ConfigError, match="3 is not an index of a list of 2"):
        apply_overrides(data, ["runs.3.name=x"])


def test_written_results_load_back(tmp_path):
    from pdlab.run import load_result

    exp = experiment(tmp_path, model={"name": "llama3-8b"}, engine={"max_num_seqs": 16, "max_model_len": 2048},
                     runs=[{"name": "a", "backend": "sim"}, {"name": "b", "mode": "disaggregated", "backend": "sim"}],
                     sweep={"rates_rps": [2, 5]})
    result = run_experiment(exp, progress=False)
    loaded = load_result(result.out_dir)
    assert sorted(loaded.runs) == sorted(result.runs)
    for label, run in result.runs.items():
        assert loaded.runs[label].records == run.records
        assert loaded.runs[label].summary == run.summary
    assert loaded.sweep.equals(result.sweep)
