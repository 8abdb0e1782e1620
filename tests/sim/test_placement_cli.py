"""`python -m pdlab.placement`: the search from the command line, and its one-line answers to bad arguments."""

import csv
import subprocess
import sys
import time

import pytest

from pdlab.placement import main

SMALL = ["--num-gpus", "2", "--tp", "1", "--num-requests", "40", "--ttft-ms", "200", "--tpot-ms", "25",
         "--prompt-len", "{kind: uniform, min_tokens: 64, max_tokens: 1024}",
         "--output-len", "{kind: fixed, tokens: 32}", "--jobs", "1", "--no-progress"]


def test_small_search_prints_every_layout_the_best_and_the_runner_up(tmp_path, capsys):
    start = time.perf_counter()
    assert main([*SMALL, "--out", str(tmp_path / "placement.csv")]) == 0
    assert time.perf_counter() - start < 10
    out = capsys.readouterr().out
    for name in ("2x mixed TP1", "1x mixed TP1", "1P(TP1)+1D(TP1)"):
        assert name in out
    lines = out.splitlines()
    best = next(line for line in lines if line.startswith("best: "))
    runner_up = next(line for line in lines if line.startswith("runner-up: "))
    rows = list(csv.DictReader((tmp_path / "placement.csv").open()))
    assert len(rows) == 3
    per_gpu = [float(r["per_gpu_goodput_rps"]) for r in rows]
    assert per_gpu == sorted(per_gpu, reverse=True) and per_gpu[0] > 0
    assert rows[0]["layout"] in best and rows[1]["layout"] in runner_up


def test_fastdeploys_deployment_ernie_wint4_tp4_prefill_and_decode(capsys):
    argv = ["--model", "ernie-4.5-300b-a47b", "--quantization", "wint4", "--num-gpus", "8", "--tp", "4",
            "--layouts", "disaggregated", "--num-requests", "40", "--ttft-ms", "2000", "--tpot-ms", "100",
            "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "best: 1P(TP4)+1D(TP4)" in out and "runner-up: none" in out
    assert "2P(TP4)" not in out  # 2P + 1D would need 12 GPUs


def test_phases_take_their_own_tp_degrees(capsys):
    argv = [*SMALL, "--num-gpus", "3", "--tp", "1,2", "--prefill-tp", "2", "--decode-tp", "1", "--layouts",
            "disaggregated"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "1P(TP2)+1D(TP1)" in out and "TP1)+" not in out and "mixed" not in out


def test_parallel_search_gives_the_same_results(tmp_path):
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    assert main([*SMALL, "--out", str(one)]) == 0
    assert main([*SMALL, "--jobs", "2", "--out", str(two)]) == 0
    assert one.read_text() == two.read_text()


@pytest.mark.parametrize("args, expected", [
    (["--tp", "3"], "--tp 3: tp=3 does not divide the model's 8 KV heads"),
    (["--tp", "two"], "--tp: expected comma-separated positive integers, got 'two'"),
    (["--tp", "16"], "no layout of the TP degrees asked for fits --num-gpus 2"),
    (["--num-gpus", "0"], "--num-gpus: must be >= 1"),
    (["--model", "no-such-model"], "in the simulator only, ernie-4.5-300b-a47b"),
    (["--layouts", "both"], "--layouts: expected colocated, disaggregated or both"),
    (["--attainment", "1.5"], "--attainment: must be in (0, 1]"),
    (["--ttft-ms", "0"], "--ttft-ms: must be > 0"),
    (["--prompt-len", "{kind: lognormal, median_tokens: 512}"],
     "--prompt-len: give exactly one of sigma and p90_tokens"),
    (["--prompt-len", "{kind: fixed, tokenz: 9}"], "--prompt-len: tokenz: unknown key (did you mean tokens?)"),
    (["--prompt-len", "{kind: fixed, tokens: 9000}"], "more than --max-model-len (8192)"),
    (["--prompt-len", "{kind: trace}"], "no trace file is given (give --trace)"),
    (["--trace", "no/such/trace.csv"], "trace file not found"),
    (["--max-num-seqs", "0"], "scheduler: max_num_seqs must be > 0"),
    (["--jobs", "0"], "--jobs: must be >= 1"),
])
def test_bad_arguments_get_one_line_and_exit_2(args, expected, capsys):
    assert main([*SMALL, *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and err.startswith("error: ")


def test_the_module_runs_and_argparse_errors_are_one_line_too():
    missing = subprocess.run([sys.executable, "-m", "pdlab.placement", "--tpot-ms", "20"], capture_output=True,
                             text=True, timeout=60, check=False)
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: the following arguments are required: --ttft-ms")
    assert missing.stderr.count("\n") == 1
    bad = subprocess.run([sys.executable, "-m", "pdlab.placement", *SMALL, "--tp", "3"], capture_output=True,
                         text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--tp 3" in bad.stderr


def test_a_trace_drives_arrivals_and_lengths(tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    rows = [f"{i * 0.7 + (i % 3) * 0.2:.3f},{64 + (i * 97) % 900},{4 + (i * 31) % 60}" for i in range(60)]
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n" + "\n".join(rows) + "\n")
    argv = ["--num-gpus", "1", "--tp", "1", "--trace", str(trace), "--num-requests", "50", "--ttft-ms", "300",
            "--tpot-ms", "30", "--no-progress"]
    assert main(argv) == 0
    assert "best: 1x mixed TP1" in capsys.readouterr().out
