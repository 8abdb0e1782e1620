"""CUDA MPS for instances that share a GPU: start the control daemon, point instances at it, stop it.

Without MPS, processes on one GPU take turns: the driver time-slices their contexts, so
a prefill step and a decode step never run at the same time. Under MPS their kernels
run side by side, and each client may be limited to a share of the SMs
(`CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`, read when the client creates its context: the
instance's `--sm-percentage`). With `per_context=True` the daemon is started with
`CUDA_MPS_ENABLE_PER_CTX_DEVICE_MULTIPROCESSOR_PARTITIONING=1` (as Semi-PD does), which
makes the limit a partition of each context rather than of the client process.

`MpsDaemon.start` uses a daemon that already answers on the pipe directory, or starts
one in a private directory (so another user's daemon in the default /tmp/nvidia-mps is
never touched) and `stop` quits only the one it started.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pdlab.errors import ConfigError

CONTROL = "nvidia-cuda-mps-control"
PIPE_ENV, LOG_ENV = "CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"
PER_CONTEXT_ENV = "CUDA_MPS_ENABLE_PER_CTX_DEVICE_MULTIPROCESSOR_PARTITIONING"
DEFAULT_PIPE_DIRECTORY = "/tmp/nvidia-mps"


class MpsError(ConfigError):
    """MPS cannot run here (no GPU, no control program, a daemon that does not start)."""


def _control(env: dict[str, str], command: str, timeout_s: float = 10.0) -> subprocess.CompletedProcess:
    return subprocess.run([CONTROL], input=command + "\n", env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout_s)


def answers(env: dict[str, str]) -> bool:
    """Whether an MPS control daemon answers on `env`'s pipe directory."""
    pipe = Path(env.get(PIPE_ENV, DEFAULT_PIPE_DIRECTORY))
    if not (pipe / "control").exists():
        return False
    try:
        return _control(env, "get_server_list", timeout_s=5.0).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@dataclass
class MpsDaemon:
    per_context: bool = True  # per-context SM partitioning (the daemon's setting)
    # What every client's environment needs: the pipe and log directories (its SM limit is --sm-percentage).
    env: dict[str, str] = field(default_factory=dict)
    started: bool = False  # this object started the daemon (and stops it)
    _dir: Path | None = None

    def start(self) -> MpsDaemon:
        if shutil.which(CONTROL) is None:
            raise MpsError(f"CUDA MPS needs {CONTROL} on PATH (it comes with the NVIDIA driver)")
        existing = {PIPE_ENV: os.environ.get(PIPE_ENV, DEFAULT_PIPE_DIRECTORY)}
        if LOG_ENV in os.environ:
            existing[LOG_ENV] = os.environ[LOG_ENV]
        if answers(existing):
            self.env = existing  # a daemon is running: use it as it is (its partitioning setting included)
            return self
        self._dir = Path(tempfile.mkdtemp(prefix="pdlab-mps-"))
        self.env = {PIPE_ENV: str(self._dir / "pipe"), LOG_ENV: str(self._dir / "log")}
        for path in self.env.values():
            Path(path).mkdir()
        daemon_env = {**os.environ, **self.env}
        if self.per_context:
            daemon_env[PER_CONTEXT_ENV] = "1"
        result = subprocess.run([CONTROL, "-d"], env=daemon_env, capture_output=True, text=True, timeout=30)
        deadline = time.monotonic() + 10.0
        while result.returncode == 0 and not answers(self.env) and time.monotonic() < deadline:
            time.sleep(0.1)
        if result.returncode != 0 or not answers(self.env):
            why = (result.stderr or result.stdout).strip() or self._log_tail() or f"exit code {result.returncode}"
            self._cleanup()
            raise MpsError(f"the CUDA MPS control daemon did not start: {why} (it needs the right to manage the GPU: "
                           f"root, or the owner of the GPU's processes; another user's daemon may hold the GPU)")
        self.started = True
        return self

    def stop(self) -> None:
        if not self.started:
            return
        try:
            _control(self.env, "quit", timeout_s=30.0)
        except (OSError, subprocess.TimeoutExpired):
            pass
        deadline = time.monotonic() + 10.0
        while answers(self.env) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.started = False
        self._cleanup()

    def _log_tail(self) -> str:
        if self._dir is None:
            return ""
        log = self._dir / "log" / "control.log"
        try:
            return " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        except OSError:
            return ""

    def _cleanup(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> MpsDaemon:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

