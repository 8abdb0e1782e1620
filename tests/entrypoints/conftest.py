"""Fixtures for the API server tests: `api_server` processes on free loopback ports, always stopped.

`ApiServer` starts `python -m pdlab.entrypoints.openai.api_server` (which starts
its engine instance as a child) without waiting, so that several load at once;
`wait_ready` polls /health. `Servers` owns the processes of a module or a test
and stops them all (SIGTERM, then SIGKILL) at teardown; each server stops its
own child, and a child whose server was killed stops itself (PDEATHSIG).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from pdlab.cluster.client import ping
from pdlab.cluster.launch import free_port
from pdlab.cluster.messages import Pong


@dataclass
class ApiServer:
    role: str
    model: str
    port: int
    metrics_port: int
    engine_worker_queue_port: int
    cache_queue_port: int
    proc: subprocess.Popen
    output_path: Path
    log_dir: Path
    argv: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.engine_worker_queue_port}"

    def output(self) -> str:
        try:
            return self.output_path.read_text(errors="replace")
        except OSError:
            return ""

    def logs(self, num_lines: int = 20) -> str:
        """The server's output and its instance's log, for failure messages."""
        text = f"--- {self.role} api_server output ---\n" + "\n".join(self.output().splitlines()[-num_lines:])
        for path in sorted(self.log_dir.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-num_lines:]
            text += f"\n--- {path.name} ---\n" + "\n".join(tail)
        return text

    def wait_ready(self, timeout_s: float = 120.0) -> ApiServer:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the {self.role} api_server exited with code {self.proc.returncode}\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail(f"the {self.role} api_server did not become healthy within {timeout_s:.0f} s\n{self.logs()}")

    def wait_exit(self, timeout_s: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the {self.role} api_server did not exit within {timeout_s:.0f} s\n{self.logs()}")

    def instance_pid(self) -> int:
        match = re.search(r"\(pid (\d+)\)", self.output())
        assert match, f"no instance pid in the banner\n{self.logs()}"
        return int(match.group(1))

    def pong(self) -> Pong | None:
        return ping(self.endpoint, timeout_s=2.0)

    def wait_idle(self, timeout_s: float = 15.0) -> Pong:
        """Every KV block free and nothing running or waiting on the instance (bounded wait)."""
        deadline = time.monotonic() + timeout_s
        while True:
            pong = self.pong()
            if pong is not None and is_idle(pong):
                return pong
            if time.monotonic() > deadline:
                pytest.fail(f"the {self.role} instance is not idle after {timeout_s:.0f} s: {pong}\n{self.logs()}")
            time.sleep(0.05)


def is_idle(pong: Pong) -> bool:
    return (pong.num_free_blocks == pong.num_blocks and pong.num_running == 0 and pong.num_waiting == 0
            and pong.num_held == 0)


class Servers:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[ApiServer] = []

    def start(self, role: str, model: str, args: Sequence[str], port: int | None = None,
              env: dict[str, str] | None = None) -> ApiServer:
        """Start an api_server (not waited for) with FastDeploy's flags on free ports, plus `args`."""
        port = port or free_port()
        metrics, ewq, cache = free_port(), free_port(), free_port()
        log_dir = self.root / f"{role}-{port}"
        log_dir.mkdir(parents=True)
        argv = [sys.executable, "-m", "pdlab.entrypoints.openai.api_server", "--model", model,
                "--splitwise-role", role, "--port", str(port), "--metrics-port", str(metrics),
                "--engine-worker-queue-port", str(ewq),
                "--cache-queue-port", str(cache), *args]
        # One thread per process on the 2-core CI machine; FastDeploy's log directory variable.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "FD_LOG_DIR": str(log_dir), **(env or {})}
        output_path = log_dir / "api_server.out"
        with open(output_path, "w") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        server = ApiServer(role, model, port, metrics, ewq, cache, proc, output_path, log_dir, argv)
        self.started.append(server)
        return server

    def stop_all(self, timeout_s: float = 15.0) -> None:
        for server in self.started:
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for server in self.started:
            try:
                server.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                server.proc.kill()  # its instance follows (PDEATHSIG)
                server.proc.wait()
        self.started.clear()


@pytest.fixture(scope="module")
def module_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    servers = Servers(tmp_path_factory.mktemp("api-servers"))
    try:
        yield servers
    finally:
        servers.stop_all()


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    servers = Servers(tmp_path / "api-servers")
    try:
        yield servers
    finally:
        servers.stop_all()
