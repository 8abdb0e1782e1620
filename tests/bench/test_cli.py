"""`python -m pdlab.bench` as a user runs it, against the fake server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pdlab.metrics.records import read_records_csv

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdlab.bench", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)


def test_cli_runs_prints_the_table_and_writes_results(fake_server, tmp_path):
    server = fake_server(ttft_s=0.02, itl_s=0.005, fail_every=5)
    out = cli("--port", str(server.port), "--num-prompts", "5", "--input-len", "12", "--output-len",
              "uniform:2:6", "--request-rate", "50", "--slo-ttft-ms", "2000", "--slo-tpot-ms", "500",
              "--output-dir", str(tmp_path), "--label", "cli-test")
    assert out.returncode == 0, out.stderr
    table = out.stdout
    for needle in ("pdlab serving benchmark: cli-test", "fake-model", "TTFT", "TPOT", "ITL", "E2E", "mean", "p99",
                   "request throughput (req/s)", "goodput (req/s)", "SLO attainment:", "80.0%",
                   "4 / 1 (of 5)", "1 requests failed", "HTTP 400: fake rejects request 5", "records.csv"):
        assert needle in table, needle
    assert "cli-test" in out.stderr  # the progress bar
    records = read_records_csv(tmp_path / "records.csv")
    assert len(records) == 5 and sum(r.ok for r in records) == 4 and {r.mode for r in records} == {"cli-test"}
    summary = json.loads((tmp_path / "summary.json").read_text())["summary"]
    assert summary["num_completed"] == 4 and summary["slo_attainment"] == 0.8


def test_cli_reports_bad_flags_and_an_absent_server(fake_server):
    out = cli("--input-len", "zipf:2", "--port", "1")
    assert out.returncode == 2 and "--input-len 'zipf:2'" in out.stderr
    out = cli("--port", "1", "--num-prompts", "1", "--input-len", "4")
    assert out.returncode == 2 and "is the server up" in out.stderr and "Traceback" not in out.stderr
    server = fake_server(fail_every=1)
    out = cli("--port", str(server.port), "--num-prompts", "2", "--input-len", "4", "--output-len", "2",
              "--no-progress")
    assert out.returncode == 1 and "2 requests failed" in out.stdout  # nothing served: a failed run
