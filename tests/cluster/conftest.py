"""Fixtures for the cluster tests: instance processes on loopback, always stopped at teardown.

`module_cluster` starts processes shared by the tests of one module (tests that
do not kill them); `cluster` starts processes owned by one test. Both return a
`Cluster`, whose `pair(...)` starts a prefill and a decode instance without
waiting, so that model loading overlaps whatever the test does next.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from pdlab import SamplingParams
from pdlab.cluster.client import RemoteEngine, ping
from pdlab.cluster.launch import InstanceProcess, start_instance
from pdlab.cluster.messages import Pong
from pdlab.engine.outputs import RequestOutput

# The CI machine has 2 cores: one thread per instance process.
ENV = {"OMP_NUM_THREADS": "1"}
TRANSFER_TIMEOUT_S = 3.0


def instance_args(protocol: str, max_model_len: int, transfer_timeout_s: float, extra: Sequence[str] = ()
                  ) -> list[str]:
    return ["--device", "cpu", "--cache-transfer-protocol", protocol, "--max-model-len", str(max_model_len),
            "--transfer-timeout-s", str(transfer_timeout_s), *extra]


@dataclass
class Pair:
    """A prefill instance and the decode instance (the entry point) that uses it."""

    prefill: InstanceProcess
    decode: InstanceProcess
    transfer_timeout_s: float = TRANSFER_TIMEOUT_S

    def wait_ready(self, timeout_s: float = 180.0) -> Pair:
        deadline = time.monotonic() + timeout_s
        for proc in (self.prefill, self.decode):
            proc.wait_ready(max(1.0, deadline - time.monotonic()))
        return self

    def logs(self, num_lines: int = 15) -> str:
        return (f"--- prefill log ---\n{self.prefill.log_tail(num_lines)}\n"
                f"--- decode log ---\n{self.decode.log_tail(num_lines)}")

    def pongs(self) -> tuple[Pong | None, Pong | None]:
        return ping(self.prefill.endpoint), ping(self.decode.endpoint)

    def wait_idle(self, timeout_s: float | None = None) -> tuple[Pong, Pong]:
        """Wait until both instances have every block free and no request; fail naming what is left.
        (A prefill frees blocks whose KVAck never comes after the transfer timeout: wait a few of them.)"""
        timeout_s = 4 * self.transfer_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            pongs = self.pongs()
            if all(p is not None and is_idle(p) for p in pongs):
                return pongs
            if time.monotonic() > deadline:
                pytest.fail(f"not idle after {timeout_s:.0f} s (leaked blocks or requests):\n"
                            f"prefill {pongs[0]}\ndecode {pongs[1]}\n{self.logs()}")
            time.sleep(0.05)


def short_request(endpoint: str, request_id: str, timeout_s: float = 30.0) -> RequestOutput:
    """One 3-token prompt and 4 greedy tokens through a fresh client of the instance at `endpoint`: does it
    still serve (or, with the error it ends with, why not)?"""
    engine = RemoteEngine(endpoint)
    try:
        engine.add_request([5, 6, 7], SamplingParams(max_tokens=4, temperature=0), request_id)
        return engine.drain(timeout_s)[request_id]
    finally:
        engine.close()


def is_idle(pong: Pong) -> bool:
    return (pong.num_free_blocks == pong.num_blocks and pong.num_held == 0
            and pong.num_running == 0 and pong.num_waiting == 0)


class Cluster:
    """Starts instance processes on free loopback ports; `stop_all` stops every one of them."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[InstanceProcess] = []
        self._how: dict[int, tuple[str, str, list[str]]] = {}  # id(proc) -> its role, model, extra args

    def start(self, role: str, model: str, args: Sequence[str], engine_worker_queue_port: int | None = None
              ) -> InstanceProcess:
        proc = start_instance(role, model, self.log_dir, engine_worker_queue_port=engine_worker_queue_port,
                              extra_args=list(args), env=ENV)
        self.procs.append(proc)
        self._how[id(proc)] = (role, model, list(args))
        return proc

    def restart(self, proc: InstanceProcess) -> InstanceProcess:
        """A new instance like `proc` (which must be gone) on its engine-worker-queue port; not waited for."""
        assert proc.proc.poll() is not None, "stop or kill the old instance first"
        role, model, args = self._how[id(proc)]
        return self.start(role, model, args, engine_worker_queue_port=proc.engine_worker_queue_port)

    def pair(self, model: str, protocol: str, *, max_model_len: int = 512, prefill_args: Sequence[str] = (),
             decode_args: Sequence[str] = (), transfer_timeout_s: float = TRANSFER_TIMEOUT_S) -> Pair:
        """Start a prefill and a decode instance (not waited for: call `wait_ready`)."""
        prefill = self.start("prefill", model, instance_args(protocol, max_model_len, transfer_timeout_s, prefill_args))
        decode = self.start("decode", model, instance_args(
            protocol, max_model_len, transfer_timeout_s,
            ["--innode-prefill-ports", str(prefill.engine_worker_queue_port), *decode_args]))
        return Pair(prefill, decode, transfer_timeout_s)

    def stop_all(self, timeout_s: float = 5.0) -> None:
        """SIGTERM to every instance at once, then SIGKILL to those still up after `timeout_s`."""
        for proc in self.procs:
            if proc.proc.poll() is None:
                proc.proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("instance-logs"))
    try:
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path / "instance-logs")
    try:
        yield cluster
    finally:
        cluster.stop_all()
