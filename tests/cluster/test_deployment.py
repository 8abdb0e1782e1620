"""`Deployment` and `start_instance` as a newcomer meets them: instances that end with whatever started them
(SIGKILL and SIGTERM of the runner included), a line per instance as it comes up, no log directory left
behind, a missing GPU refused before anything starts, and a dead instance reported by its error line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pdlab.cluster.deployment import Deployment
from pdlab.cluster.launch import InstanceProcess, LaunchError
from pdlab.errors import ConfigError
from pdlab.lifetime import GRACE_S, POLL_S
from tests.test_lifetime import alive, gone_within

# A runner as `python -m pdlab.run` is one: a deployment in the main thread, stopped on Ctrl-C or SIGTERM.
RUNNER = """
import sys, time
from pdlab.cluster.deployment import Deployment
from pdlab.cluster.launch import Terminated
try:
    with Deployment("tiny", "colocated", ["--device", "cpu", "--max-model-len", "256"]) as d:
        print(d.instances[0].proc.pid, d.instances[0].log_path.parent, flush=True)
        time.sleep(600)
except Terminated:
    sys.exit(143)
"""
MARGIN_S = 10.0  # a loaded 2-core machine delays every wake-up
STOP_S = 10.0  # how long InstanceProcess.stop waits after SIGTERM before SIGKILL


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_instances_end_with_the_runner_that_started_them(sig):
    runner = subprocess.Popen([sys.executable, "-c", RUNNER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    pid = None
    try:
        line = runner.stdout.readline()
        assert line, f"the runner never started its instance:\n{runner.communicate(timeout=60)[1][-3000:]}"
        pid, log_dir = int(line.split()[0]), Path(line.split()[1])
        runner.send_signal(sig)
        if sig == signal.SIGKILL:  # nothing runs in the runner any more: the instance follows it by itself
            runner.wait(10)
            assert gone_within(pid, POLL_S + GRACE_S + MARGIN_S), "the instance outlived its killed runner"
        else:  # unwound as on Ctrl-C: the instance stopped, its temporary logs removed
            assert runner.wait(STOP_S + MARGIN_S) == 143, runner.stderr.read()[-3000:]
            assert not alive(pid), "the runner exited before its instance"
            assert not log_dir.exists(), "the temporary log directory was left behind"
            assert "mixed instance 1/1 ready after" in runner.stderr.read()
    finally:
        if runner.poll() is None:
            runner.kill()
        if pid is not None and alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_missing_gpu_is_refused_before_any_instance_starts(tmp_path):
    deployment = Deployment("tiny", "colocated", ["--device", "cuda"], log_dir=tmp_path, progress=False)
    start_s = time.monotonic()
    with pytest.raises(ConfigError, match=r"^device cuda: this machine has no CUDA GPU .*; use device cpu or auto$"):
        deployment.start()
    assert time.monotonic() - start_s < 5.0 and not deployment.instances and not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_the_runner_refuses_a_missing_gpu_without_a_traceback_before_starting_instances(tmp_path):
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-m", "pdlab.run", "experiments/quickstart.yaml",
                             "--set", "model.device=cuda", "--output-dir", str(tmp_path), "--no-progress"],
                            cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "device cuda: this machine has no CUDA GPU" in lines[0], result.stderr
    assert not (tmp_path / "quickstart" / "logs").exists(), "an instance was started"


def test_an_instance_that_died_is_reported_by_its_error_line_not_its_traceback(tmp_path):
    log = tmp_path / "mixed-1.log"
    log.write_text("2026-01-01 INFO loading tiny\nTraceback (most recent call last):\n"
                   '  File "x.py", line 1, in <module>\n    torch.zeros(1, device="cuda")\n'
                   "    ~~~~~~~~~~~^^^^^^^^^^^^^^^^^\n"
                   "AssertionError: Torch not compiled with CUDA enabled\n")
    died = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    died.wait()
    with pytest.raises(LaunchError) as failure:
        InstanceProcess("mixed", 1, 2, died, log).wait_ready(5.0)
    assert str(failure.value) == ("mixed instance exited with code 1: AssertionError: Torch not compiled with CUDA "
                                  f"enabled (log: {log})")
    log.write_text("loading\nerror: no preset, directory or file is called 'x'\n")
    assert InstanceProcess("mixed", 1, 2, died, log).last_error() == "error: no preset, directory or file is called 'x'"


def test_instance_ports_come_from_below_the_ephemeral_range_where_outgoing_connections_cannot_take_them():
    import socket

    from pdlab.cluster.launch import _ephemeral_low, free_port

    ports = {free_port() for _ in range(20)}
    assert all(10000 <= p < _ephemeral_low() for p in ports) and len(ports) > 15
    for port in ports:  # each was free when chosen
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
