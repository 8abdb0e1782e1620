"""`pdlab.lifetime`: a child started through `child_env` that calls `follow_parent` ends with its parent, however
the parent ends, through Linux's parent-death signal or through the watchdog alone (other platforms)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from pdlab.lifetime import GRACE_S, PARENT_PID_ENV, POLL_S
from tests.processes import alive

# Both processes are plain Python (no torch): they start in well under a second.
CHILD = """
import signal, sys, time
from pdlab.lifetime import follow_parent
if sys.argv[2] == "ignore-sigterm":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
follow_parent(grace_s=float(sys.argv[3]), use_prctl=sys.argv[1] == "prctl")
print("following", flush=True)
time.sleep(600)
"""
PARENT = """
import subprocess, sys, time
from pdlab.lifetime import child_env
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], env=child_env(), start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""
# Generous: a loaded 2-core CI machine delays every wake-up.
MARGIN_S = 10.0
LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")


def gone_within(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


def start_family(how: str, on_sigterm: str = "default", grace_s: float = GRACE_S) -> tuple[subprocess.Popen, int]:
    """A parent process and its following child; returns once the child follows."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, how, on_sigterm, str(grace_s)],
                              stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "following"  # the child's output goes to the same pipe
    return parent, child_pid


@pytest.mark.parametrize("how", [pytest.param("prctl", marks=LINUX), "watchdog"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_the_child_ends_with_its_parent(how, sig):
    parent, child_pid = start_family(how)
    try:
        parent.send_signal(sig)
        parent.wait(10)
        assert gone_within(child_pid, POLL_S + MARGIN_S), f"the child outlived its parent ({how})"
    finally:
        parent.stdout.close()
        if alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def test_a_child_that_ignores_the_signal_ends_after_the_grace_period():
    grace_s = 1.0
    parent, child_pid = start_family("watchdog", "ignore-sigterm", grace_s)
    try:
        parent.kill()
        parent.wait(10)
        time.sleep(POLL_S)
        assert alive(child_pid), "ended before its grace period: SIGTERM should have been ignored"
        assert gone_within(child_pid, grace_s + POLL_S + MARGIN_S), "the watchdog's os._exit never came"
    finally:
        parent.stdout.close()
        if alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def test_a_parent_gone_before_the_child_follows_it_ends_the_child_at_once():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    child = subprocess.Popen([sys.executable, "-c", CHILD, "watchdog", "default", str(GRACE_S)],
                             env={**os.environ, PARENT_PID_ENV: str(gone.pid)}, stdout=subprocess.DEVNULL)
    try:
        assert child.wait(POLL_S + MARGIN_S) == -signal.SIGTERM
    finally:
        child.kill()


def test_a_child_started_by_hand_follows_nobody():
    env = {k: v for k, v in os.environ.items() if k != PARENT_PID_ENV}
    code = "import threading; from pdlab import lifetime; lifetime.follow_parent(); print(threading.active_count())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "1", "no watchdog thread without a parent to follow"
