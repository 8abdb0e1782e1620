"""The report `python -m pdlab.run` prints: metric names a reader knows, with units, the SLOs it judged
against, and a progress bar for simulated runs too."""

from __future__ import annotations

import pytest

from pdlab.experiment import parse_experiment
from pdlab.results import TABLE_ROWS, format_report
from pdlab.run import run_experiment

SIM = {
    "name": "report", "model": "llama3-8b",
    "engine": {"max_num_seqs": 32, "max_num_batched_tokens": 2048, "max_model_len": 4096},
    "workload": {"num_requests": 30, "arrival": {"kind": "poisson", "rate_rps": 8},
                 "prompt_len": {"kind": "uniform", "min_tokens": 64, "max_tokens": 1024},
                 "output_len": {"kind": "fixed", "tokens": 16}},
    "runs": [{"name": "colocated", "backend": "sim"}, {"name": "1p1d", "mode": "disaggregated", "backend": "sim"}],
    "slo": {"ttft_ms": 500, "tpot_ms": 50},
}


def report_of(tmp_path, **changes) -> str:
    exp = parse_experiment({**SIM, "output_dir": str(tmp_path), **changes})
    return format_report(run_experiment(exp, progress=False, write=False))


def test_the_table_names_each_metric_with_its_unit_and_says_what_it_was_judged_against(tmp_path):
    report = report_of(tmp_path)
    for label in ("throughput (req/s)", "TTFT p90 (ms)", "TPOT p50 (ms)", "E2E latency p50 (ms)",
                  "within SLOs (%)", "goodput (req/s within SLOs)"):
        assert label in report, report
    assert not any(key in report for key in TABLE_ROWS), "a snake_case metric name was printed"
    assert "TTFT: arrival to first token; TPOT: time per output token after the first" in report
    assert "SLOs judged against: TTFT <= 500 ms and TPOT <= 50 ms" in report
    attainment = next(line for line in report.splitlines() if line.startswith("within SLOs (%)"))
    assert [float(v) for v in attainment.split()[3:]] == [100.0, 100.0], "a percentage, not a fraction"


def test_a_sweep_without_slos_says_so_and_leaves_out_what_it_cannot_judge(tmp_path):
    report = report_of(tmp_path, slo={}, sweep={"rates_rps": [4, 8]})
    assert "rate (req/s)" in report.splitlines()[0] and "TTFT p50 (ms)" in report.splitlines()[0]
    assert "goodput" not in report.splitlines()[0] and "within SLOs" not in report.splitlines()[0]
    assert "No SLOs set (slo.ttft_ms, slo.tpot_ms): goodput not judged." in report


@pytest.mark.parametrize("progress", [True, False])
def test_a_simulated_run_shows_its_progress(tmp_path, capsys, progress):
    exp = parse_experiment({**SIM, "output_dir": str(tmp_path), "sweep": {"rates_rps": [4]}})
    run_experiment(exp, progress=progress, write=False)
    err = capsys.readouterr().err
    assert ("colocated @ 4 req/s (simulated)" in err and "30/30" in err) == progress, err
