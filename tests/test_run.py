"""`python -m pdlab.run`: the main job end to end, and its answers to bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pdlab.metrics.records import read_records_csv
from pdlab.run import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdlab.run", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_quickstart_runs_end_to_end_and_writes_results(tmp_path, capsys):
    code = main([str(QUICKSTART), "--output-dir", str(tmp_path), "--set", "workload.num_requests=6",
                 "--set", "workload.arrival.rate_rps=20", "--no-progress"])
    assert code == 0
    out_dir = tmp_path / "quickstart"
    records = read_records_csv(out_dir / "records.csv")
    assert len(records) == 12 and all(r.ok for r in records)
    assert {r.mode for r in records} == {"colocated", "disaggregated"}
    assert all(r.first_token_s >= r.arrival_s and r.finish_s >= r.first_token_s for r in records)
    for name in ("summary.csv", "cdf.png", "cdf.svg", "timeline.png", "provenance.json", "texts.json"):
        assert (out_dir / name).stat().st_size > 0, name
    texts = json.loads((out_dir / "texts.json").read_text())
    assert "Paris" in texts["colocated"]["req-0"]["answer"]
    assert texts["disaggregated"] == texts["colocated"]
    report = capsys.readouterr().out
    assert "TTFT p50 (ms)" in report and "Paris" in report and "disaggregated" in report
    provenance = json.loads((out_dir / "provenance.json").read_text())
    assert provenance["experiment"]["workload"]["num_requests"] == 6 and provenance["versions"]["torch"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


BASE = QUICKSTART.read_text()


@pytest.mark.parametrize(
    "text, expected",
    [
        (BASE.replace("block_size: 16", "blok_size: 16"), "engine.blok_size: unknown key (did you mean block_size?)"),
        (BASE.replace("name: smollm2", "name: no-such-model"), "no preset, directory or file is called 'no-such-model'"),
        (BASE + "\n  bad: [unclosed\n", "malformed YAML"),
        (BASE.replace("rate_rps: 4.0", "rate_rps: -1"), "workload.arrival.rate_rps"),
        (BASE.replace("temperature: 0.0", "temperature: -1"), "sampling.temperature"),
        (BASE.replace("top_p: 1.0", "top_p: 0"), "sampling.top_p"),
    ],
)
def test_bad_input_ends_with_one_clear_message(tmp_path, text, expected):
    result = cli(str(write(tmp_path, text)), "--output-dir", str(tmp_path))
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_file_and_bad_override(tmp_path):
    result = cli(str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "no such experiment file" in result.stderr
    result = cli(str(QUICKSTART), "--set", "workload.num_requests=-3")
    assert result.returncode == 2 and "workload.num_requests" in result.stderr and "Traceback" not in result.stderr


def test_prompt_longer_than_the_context_is_refused(tmp_path):
    text = BASE.replace("max_model_len: 2048", "max_model_len: 64")
    result = cli(str(write(tmp_path, text)), "--output-dir", str(tmp_path))
    assert result.returncode == 2
    assert "max_model_len (64)" in result.stderr and "Traceback" not in result.stderr


def test_sim_backend_runs_the_same_request_list(tmp_path, capsys):
    text = """
name: simcheck
model: llama3-8b
engine: {max_num_seqs: 32, max_num_batched_tokens: 2048, max_model_len: 4096}
workload:
  num_requests: 40
  arrival: {kind: poisson, rate_rps: 8}
  prompt_len: {kind: uniform, min_tokens: 64, max_tokens: 1024}
  output_len: {kind: fixed, tokens: 32}
runs:
  - {name: colocated, mode: colocated, backend: sim}
  - {name: 1p1d, mode: disaggregated, backend: sim, link: nvlink}
slo: {ttft_ms: 500, tpot_ms: 50}
"""
    assert main([str(write(tmp_path, text)), "--output-dir", str(tmp_path), "--no-progress"]) == 0
    records = read_records_csv(tmp_path / "simcheck" / "records.csv")
    assert len(records) == 80 and all(r.ok and r.backend == "sim" for r in records)
    by_mode = {m: sorted((r.request_id, r.arrival_s, r.num_prompt_tokens) for r in records if r.mode == m)
               for m in ("colocated", "disaggregated")}
    assert by_mode["colocated"] == by_mode["disaggregated"]  # the same requests, arriving at the same times
    assert all(r.num_output_tokens == 32 for r in records)
    assert "1p1d" in capsys.readouterr().out


def test_sim_backend_runs_fastdeploys_ernie_deployment_with_both_routings(tmp_path, capsys):
    text = """
name: erniesim
model: {name: ernie-4.5-300b-a47b, quantization: wint4}
engine: {max_num_seqs: 32, max_num_batched_tokens: 2048, max_model_len: 4096, tensor_parallel_size: 4}
workload:
  num_requests: 30
  arrival: {kind: poisson, rate_rps: 4}
  prompt_len: {kind: uniform, min_tokens: 64, max_tokens: 1024}
  output_len: {kind: fixed, tokens: 16}
runs:
  - {name: innode, mode: disaggregated, num_prefill: 2, backend: sim}
  - {name: splitwise, mode: disaggregated, num_prefill: 2, backend: sim, routing: splitwise}
"""
    assert main([str(write(tmp_path, text)), "--output-dir", str(tmp_path), "--no-progress"]) == 0
    records = read_records_csv(tmp_path / "erniesim" / "records.csv")
    assert len(records) == 60 and all(r.ok and r.backend == "sim" and r.num_output_tokens == 16 for r in records)
    assert "splitwise" in capsys.readouterr().out


@pytest.mark.parametrize("run, expected", [
    ("{name: r, mode: disaggregated, routing: splitwise}", "routing: splitwise runs only with backend: sim"),
    ("{name: s, mode: disaggregated, backend: sim, routing: redis}", "runs[0].routing"),
])
def test_routing_mistakes(tmp_path, run, expected):
    text = BASE.split("runs:")[0] + f"runs:\n  - {run}\n"
    result = cli(str(write(tmp_path, text)), "--output-dir", str(tmp_path))
    assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr


def test_a_model_too_big_for_its_gpus_is_refused_in_the_sim(tmp_path):
    text = """
name: toobig
model: ernie-4.5-300b-a47b
workload: {num_requests: 2, arrival: {kind: burst}, prompt_len: {kind: fixed, tokens: 8}, output_len: {kind: fixed, tokens: 2}}
runs: [{name: one, backend: sim}]
"""
    result = cli(str(write(tmp_path, text)), "--output-dir", str(tmp_path))
    assert result.returncode == 1 and "run one failed" in result.stderr and "use more GPUs per instance" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_failing_run_keeps_the_runs_before_it_and_the_command_exits_non_zero(tmp_path):
    """The second run cannot start (a model too big for its GPU in the simulator); the first run's results
    stay on disk, the third still runs, and the command names the failed run and exits 1."""
    text = """
name: keep
model: tiny
workload: {num_requests: 4, arrival: {kind: poisson, rate_rps: 50}, prompt_len: {kind: fixed, tokens: 8},
           output_len: {kind: fixed, tokens: 3}}
sampling: {temperature: 0}
sweep: {rates_rps: [20, 40]}
runs:
  - {name: first, backend: sim}
  - {name: broken, backend: sim, profile: no/such/profile.csv}
  - {name: third, backend: sim}
"""
    result = cli(str(write(tmp_path, text)), "--output-dir", str(tmp_path))
    assert result.returncode == 1, result.stderr
    assert "1 run(s) failed (broken: " in result.stderr and "Traceback" not in result.stderr
    out = tmp_path / "keep"
    sweep = pd.read_csv(out / "sweep.csv")
    assert sorted(set(sweep["run"])) == ["first", "third"] and len(sweep) == 4
    assert "broken" in json.loads((out / "provenance.json").read_text())["failures"]


def test_an_unwritable_output_dir_is_refused_before_anything_runs(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = cli(str(QUICKSTART), "--output-dir", str(blocker / "below"), "--set", "workload.num_requests=2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: cannot write results under ") and len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_experiment_says_so_in_one_line_and_keeps_what_it_measured(tmp_path, sig, code):
    """Interrupted while its second rate runs: one line, no traceback, the first rate's results on disk."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdlab.run", str(QUICKSTART), "--output-dir", str(tmp_path), "--no-progress",
         "--set", "model.name=tiny", "--set", "workload.num_requests=4", "--set", "sweep={rates_rps: [50, 0.05]}",
         "--runs", "colocated"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    sweep = tmp_path / "quickstart" / "sweep.csv"
    deadline = time.monotonic() + 240
    while not sweep.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert sweep.exists(), "the first rate was never written"
    proc.send_signal(sig)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == code and "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("interrupted: instances stopped; the rates measured so far")
    assert len(pd.read_csv(sweep)) == 1
