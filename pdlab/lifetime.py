"""Child processes that end with the process that started them, however it ends (kill -9 included).

    proc = subprocess.Popen(argv, env=child_env(env))      # the parent
    follow_parent()                                       # first thing in the child's main

`child_env` names the parent in the child's environment ($PDLAB_PARENT_PID);
`follow_parent` makes the child get `sig` (SIGTERM: its own handler stops it
cleanly) once that parent is gone: at once on Linux (prctl PR_SET_PDEATHSIG),
and everywhere from a watchdog thread that sees its parent pid change within
`POLL_S`. A parent that died while the child was still starting counts the
same. A child still alive `grace_s` after the signal (it ignores it, or its
main thread is stuck in C code) ends with `os._exit`.

Why in the child, not in a `preexec_fn`: that runs Python between fork and
exec, which can deadlock a parent with threads (zmq's, in the runner). Linux
sends the parent-death signal when the *thread* that started the child ends:
start children from a thread that lives as long as they should (the main one).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Mapping

PARENT_PID_ENV = "PDLAB_PARENT_PID"
POLL_S = 0.5  # how often the watchdog looks at its parent pid
GRACE_S = 10.0  # from the signal to os._exit: time for a clean stop (an instance frees its KV cache file)


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's environment), naming this process as the parent to follow."""
    return {**(os.environ if env is None else env), PARENT_PID_ENV: str(os.getpid())}


def follow_parent(sig: int = signal.SIGTERM, grace_s: float = GRACE_S,
                  use_prctl: bool = sys.platform.startswith("linux")) -> None:
    """End this process when the parent named by `child_env` ends; nothing if none was named (started by hand).

    `use_prctl=False` leaves only the watchdog (what other platforms get)."""
    text = os.environ.pop(PARENT_PID_ENV, None)  # this process's own children follow it, not its parent
    if not text:
        return
    if use_prctl:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)  # failing leaves the watchdog
    threading.Thread(target=_watch, args=(int(text), sig, grace_s), name="parent-watchdog", daemon=True).start()


def _watch(parent_pid: int, sig: int, grace_s: float) -> None:
    while os.getppid() == parent_pid:  # a child whose parent died is re-parented (to init or a subreaper)
        time.sleep(POLL_S)
    os.kill(os.getpid(), sig)
    time.sleep(grace_s)
    os._exit(1)
