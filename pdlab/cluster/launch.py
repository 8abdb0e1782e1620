"""Start instance processes and wait until they answer; stop them again."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pdlab.cluster.client import ping
from pdlab.errors import PdlabError


class LaunchError(PdlabError):
    """An instance exited or did not answer in time; the message carries its log's tail."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class InstanceProcess:
    role: str
    engine_worker_queue_port: int
    cache_queue_port: int
    proc: subprocess.Popen
    log_path: Path
    host: str = "127.0.0.1"
    argv: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.host}:{self.engine_worker_queue_port}"

    def log_tail(self, num_lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LaunchError(f"{self.role} instance exited with code {self.proc.returncode}:\n{self.log_tail()}")
            if ping(self.endpoint, timeout_s=0.5) is not None:
                return
        raise LaunchError(f"{self.role} instance did not answer within {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """kill -9: no cleanup at all, as when a machine dies."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_instance(
    role: str,
    model: str,
    log_dir: Path,
    engine_worker_queue_port: int | None = None,
    cache_queue_port: int | None = None,
    extra_args: list[str] = (),
    env: dict[str, str] | None = None,
    host: str = "127.0.0.1",
) -> InstanceProcess:
    """Start `python -m pdlab.cluster.instance` in the background; its output goes to a log file."""
    ewq = engine_worker_queue_port or free_port(host)
    cache = cache_queue_port or free_port(host)
    argv = [sys.executable, "-m", "pdlab.cluster.instance", "--splitwise-role", role, "--model", model,
            "--engine-worker-queue-port", str(ewq), "--cache-queue-port", str(cache), "--host", host, *extra_args]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{role}-{ewq}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
    return InstanceProcess(role, ewq, cache, proc, log_path, host, argv)
