"""Start instance processes and wait until they answer; stop them again.

Instances end with the process that started them, however it ends
(`pdlab.lifetime`); while a `Deployment` runs, SIGTERM unwinds its starter as
Ctrl-C does (`interrupt_on_sigterm`), so that the instances are stopped cleanly.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pdlab.cluster.client import ping
from pdlab.errors import PdlabError
from pdlab.lifetime import child_env


class LaunchError(PdlabError):
    """An instance exited or did not answer in time; the message carries its last error line and its log's path."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so that the same unwinding stops every instance."""


def _raise_terminated(*_) -> None:
    raise Terminated()


def interrupt_on_sigterm() -> Callable[[], None]:
    """From now on SIGTERM raises `Terminated` in the main thread; returns the function that undoes it.

    Changes nothing (and undoes nothing) outside the main thread or where SIGTERM already has a handler."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return lambda: None
    signal.signal(signal.SIGTERM, _raise_terminated)

    def undo() -> None:
        if signal.getsignal(signal.SIGTERM) is _raise_terminated:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    return undo


_LOWEST_PORT = 10000
_ports = random.Random()  # not the experiment's seeds: port choice must not repeat between processes


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now, below the kernel's ephemeral range: a port the kernel hands out for bind(0)
    can be taken by any outgoing connection (a client's, a zmq peer's) between this check and the
    instance's bind, and a busy test run saw exactly that; ports below the range are only ever taken by an
    explicit bind."""
    low = _ephemeral_low()
    for _ in range(100):
        port = _ports.randrange(_LOWEST_PORT, low)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # all tried were taken: let the kernel pick
        s.bind((host, 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default; other systems: their ranges start at 32768 or 49152
    return max(low, _LOWEST_PORT + 1000)


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

    def last_error(self) -> str:
        """The line of its log that says what went wrong: a traceback's exception line, else the last
        `error: ...` line, else the last line."""
        lines = [line for line in self.log_tail(10_000).splitlines() if line.strip()]
        for i in range(len(lines) - 1, -1, -1):
            if lines[i].startswith("Traceback (most recent call last)"):
                # The exception is the first unindented line after the frames (of the last traceback).
                return next((line for line in lines[i + 1:] if not line[0].isspace()), lines[-1])
        errors = [line for line in lines if line.startswith("error: ")]
        return (errors or lines or ["(its log is empty)"])[-1]

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LaunchError(f"{self.role} instance exited with code {self.proc.returncode}: "
                                  f"{self.last_error()} (log: {self.log_path})")
            if ping(self.endpoint, timeout_s=0.5) is not None:
                return
        raise LaunchError(f"{self.role} instance did not answer within {timeout_s:.0f} s: {self.last_error()} "
                          f"(log: {self.log_path})")

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
    """Start `python -m pdlab.cluster.instance` in the background, in its own session (Ctrl-C reaches only
    this process, which stops it) and ending with this process; its output goes to a log file."""
    ewq = engine_worker_queue_port or free_port(host)
    cache = cache_queue_port or free_port(host)
    argv = [sys.executable, "-m", "pdlab.cluster.instance", "--splitwise-role", role, "--model", model,
            "--engine-worker-queue-port", str(ewq), "--cache-queue-port", str(cache), "--host", host, *extra_args]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{role}-{ewq}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                env=child_env({**os.environ, **(env or {})}), start_new_session=True)
    return InstanceProcess(role, ewq, cache, proc, log_path, host, argv)
