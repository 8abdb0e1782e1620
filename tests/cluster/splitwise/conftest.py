"""Real Redis servers (on free loopback ports, no persistence): one per test module (`redis_server`) or a
test's own (`redis_servers`), and instance arguments.

Every Redis test goes through these fixtures: without `redis-server` on PATH they skip, saying how to get
one; with $PDLAB_REQUIRE_REDIS=1 (`.ci/run` sets it, and installs the server) they fail instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from pdlab.cluster.launch import free_port
from pdlab.cluster.splitwise.keys import Keys
from tests.margins import STALL_S

HEARTBEAT_S = 0.1
# --scheduler-expire-s: a live instance held up for less than this on a loaded machine is never dropped.
EXPIRE_S = STALL_S
REQUIRE_REDIS_ENV = "PDLAB_REQUIRE_REDIS"


def require_redis_server() -> None:
    """Skip the calling test, saying how to run it, when `redis-server` is not on PATH; fail it instead
    under $PDLAB_REQUIRE_REDIS=1, so that CI cannot stop running the Redis tests without noticing."""
    if shutil.which("redis-server") is not None:
        return
    why = ("redis-server is not on PATH: install it (apt-get install redis-server, or brew install redis) "
           "to run the splitwise scheduler's tests")
    if os.environ.get(REQUIRE_REDIS_ENV) == "1":
        pytest.fail(f"{why}; ${REQUIRE_REDIS_ENV}=1 requires them", pytrace=False)
    pytest.skip(why)


class RedisServer:
    """`redis-server` on 127.0.0.1:`port`; can be killed and started again on the same port."""

    def __init__(self, directory: Path, port: int | None = None, bind: tuple[str, ...] = ("127.0.0.1",),
                 password: str | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.bind = bind
        self.password = password
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory / f"redis-{self.port}.log", "a")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", *self.bind, "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), *(["--requirepass", self.password] if self.password else [])],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.client().ping():
                    return self
            except redis.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_connect_timeout=1,
                           socket_timeout=2)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server for the tests of a module."""
    require_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def redis_servers(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """`redis_servers(bind=..., password=...)` starts a server of the test's own (to kill, restart or
    protect with a password); every one is killed at teardown."""
    require_redis_server()
    started: list[RedisServer] = []

    def start(**kwargs) -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(started)}", **kwargs)
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in started:
            server.kill()


def splitwise_args(server: RedisServer, topic: str, protocol: str = "tcp", *, max_model_len: int = 512,
                   ttl_s: float = 60.0, extra: list[str] = (), scheduler_host: str = "127.0.0.1") -> list[str]:
    """Instance flags for a splitwise deployment on `server` under `topic` (each test its own topic)."""
    return ["--device", "cpu", "--max-model-len", str(max_model_len), "--cache-transfer-protocol", protocol,
            "--transfer-timeout-s", "3", "--scheduler-name", "splitwise", "--scheduler-host", scheduler_host,
            "--scheduler-port", str(server.port), "--scheduler-topic", topic, "--scheduler-ttl", str(ttl_s),
            "--scheduler-heartbeat-s", str(HEARTBEAT_S), "--scheduler-expire-s", str(EXPIRE_S),
            *(["--scheduler-password", server.password] if server.password else []), *extra]


def new_topic() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


class Hosts:
    """Network namespaces on one bridge: "machines" with their own addresses, made and removed by the test.

    The bridge (in this namespace) has `gateway`; namespace i has `address(i)`. `run_in(i, argv)` is the
    prefix that runs a command inside namespace i. `cut(i)` takes namespace i's link down.
    """

    SUBNET = "10.231.{}.{}"

    def __init__(self, count: int) -> None:
        tag = f"{os.getpid() % 10000}{uuid.uuid4().hex[:3]}"
        self.bridge = f"pdbr{tag}"
        self.names = [f"pdns{tag}{i}" for i in range(count)]
        self.third = os.getpid() % 200 + 20
        self.gateway = self.SUBNET.format(self.third, 1)

    def address(self, i: int) -> str:
        return self.SUBNET.format(self.third, i + 2)

    def run_in(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[i]]

    def veth(self, i: int) -> str:
        return f"pdv{self.names[i][4:]}"

    def up(self) -> Hosts:
        sh(f"ip link add {self.bridge} type bridge")
        sh(f"ip addr add {self.gateway}/24 dev {self.bridge}")
        sh(f"ip link set {self.bridge} up")
        for i, name in enumerate(self.names):
            sh(f"ip netns add {name}")
            sh(f"ip link add {self.veth(i)} type veth peer name eth0 netns {name}")
            sh(f"ip link set {self.veth(i)} master {self.bridge} up")
            sh(f"ip -n {name} addr add {self.address(i)}/24 dev eth0")
            sh(f"ip -n {name} link set eth0 up")
            sh(f"ip -n {name} link set lo up")
        return self

    def cut(self, i: int) -> None:
        sh(f"ip link set {self.veth(i)} down")

    def down(self) -> None:
        for i, name in enumerate(self.names):
            sh(f"ip link del {self.veth(i)}", check=False)
            sh(f"ip netns del {name}", check=False)
        sh(f"ip link del {self.bridge}", check=False)


def sh(command: str, check: bool = True) -> None:
    result = subprocess.run(command.split(), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{command}: {result.stderr.strip()}")


@contextlib.contextmanager
def network_hosts(count: int) -> Iterator[Hosts]:
    """`count` "machines" (network namespaces on one bridge), removed afterwards; skips the test where
    namespaces cannot be made (not root, no iproute2)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (the CI machine has both)")
    made = Hosts(count)
    try:
        made.up()
    except RuntimeError as e:
        made.down()
        pytest.skip(f"cannot make network namespaces here: {e}")
    try:
        yield made
    finally:
        made.down()


def node_ids(server: RedisServer, topic: str) -> set[str]:
    """The node ids registered in `topic`'s cluster hash."""
    return {k.decode() for k in server.client().hkeys(Keys(topic).cluster)}


def wait_nodes(server: RedisServer, topic: str, num: int, timeout_s: float = 30.0) -> set[str]:
    """Wait until at least `num` nodes have registered."""
    deadline = time.monotonic() + timeout_s
    while len(ids := node_ids(server, topic)) < num:
        assert time.monotonic() < deadline, f"only {sorted(ids)} registered in {timeout_s:.0f} s"
        time.sleep(0.05)
    return ids


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    """Two "machines" (network namespaces)."""
    with network_hosts(2) as made:
        yield made
