"""Security: where pdlab listens, who it listens to, and what it never deserialises.

- Every listening socket of an instance and of an api_server (the process and its children, matched by
  inode through psutil) is on the configured --host: 127.0.0.1 by default, another loopback address
  when told, never the wildcard; and there are no ports but the configured ones. A tensor-parallel
  instance's ranks add gloo's sockets, on 127.0.0.1.
- With a cluster token ($PDLAB_CLUSTER_TOKEN or --cluster-token), messages to an instance's control-plane
  ports without it, or with a wrong one, are refused and logged; the deployment serves clients that have
  it. The api_server hands the token to its instance in the environment, never on the command line.
- A pickle payload (one that would create a file when unpickled) on every control-plane port and in
  every Redis key the splitwise scheduler reads is refused, and the instances keep serving; no module that
  reads sockets or Redis calls a pickle loader.
"""

from __future__ import annotations

import ast
import os
import pickle
import time
from pathlib import Path

import httpx
import psutil
import pytest
import zmq

import pdlab
from pdlab import SamplingParams
from pdlab.cluster.auth import TOKEN_ENV
from pdlab.cluster.client import RemoteEngine, ping
from pdlab.cluster.launch import free_port
from pdlab.cluster.messages import Ping, encode
from pdlab.cluster.splitwise.keys import Keys

from .conftest import new_topic, short_request, splitwise_args, wait_idle

MAX_LEN = 128


def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket listening in the process `pid` or its children."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    found = set()
    for proc in procs:
        for conn in proc.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                found.add((conn.laddr.ip, conn.laddr.port))
    return found


def wait_http(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{url} never became healthy")


@pytest.mark.parametrize("host", [None, "127.0.0.2"])
def test_every_port_of_an_api_server_and_its_instance_binds_the_configured_host(servers, host):
    args = ["--device", "cpu", "--max-model-len", str(MAX_LEN)]
    pd_port = free_port()
    if host is not None:
        args += ["--host", host]
    server = servers.start("mixed", "tiny", [*args, "--pd-comm-port", str(pd_port)])
    want_host = host or "127.0.0.1"
    wait_http(f"http://{want_host}:{server.port}")
    ports = listening(server.proc.pid)
    wanted = {server.port, server.metrics_port, server.engine_worker_queue_port, server.cache_queue_port, pd_port}
    assert {ip for ip, _ in ports} == {want_host}, ports
    assert {port for _, port in ports} == wanted, f"unexpected listening ports: {ports}"


def test_every_port_of_a_disaggregated_pair_binds_the_configured_host(cluster):
    host = "127.0.0.3"
    prefill_pd, decode_pd, metrics = free_port(), free_port(), free_port()
    prefill = cluster.start("prefill", "tiny", ["--device", "cpu", "--host", host, "--max-model-len", str(MAX_LEN),
                                                "--pd-comm-port", str(prefill_pd), "--cache-transfer-protocol", "tcp"])
    decode = cluster.start("decode", "tiny", ["--device", "cpu", "--host", host, "--max-model-len", str(MAX_LEN),
                                              "--pd-comm-port", str(decode_pd), "--metrics-port", str(metrics),
                                              "--cache-transfer-protocol", "tcp",
                                              "--innode-prefill-ports", str(prefill.engine_worker_queue_port)])
    for proc in (prefill, decode):
        proc.host = host  # where wait_ready pings it
        proc.wait_ready(120)
    assert listening(prefill.proc.pid) == {(host, p) for p in (prefill.engine_worker_queue_port,
                                                               prefill.cache_queue_port, prefill_pd)}
    assert listening(decode.proc.pid) == {(host, p) for p in (decode.engine_worker_queue_port,
                                                              decode.cache_queue_port, decode_pd, metrics)}


def test_a_tensor_parallel_instance_and_its_ranks_listen_on_loopback_only(cluster):
    # The ranks meet through a file store (a tcp:// store listened on every interface) and gloo keeps
    # its pair sockets on the loopback interface: whatever else listens is on 127.0.0.1.
    instance = cluster.start("mixed", "tiny", ["--device", "cpu", "--tensor-parallel-size", "2",
                                               "--max-model-len", str(MAX_LEN)])
    instance.wait_ready(120)
    ports = listening(instance.proc.pid)
    assert {ip for ip, _ in ports} == {"127.0.0.1"}, ports
    assert {instance.engine_worker_queue_port, instance.cache_queue_port} <= {port for _, port in ports}
    assert len(psutil.Process(instance.proc.pid).children(recursive=True)) == 1  # the second rank


# --- the cluster token ----------------------------------------------------------------------------------


def test_a_cluster_token_is_required_on_every_control_plane_port_and_logged_when_missing(cluster, monkeypatch):
    token = "pd-cluster-secret"
    monkeypatch.setenv(TOKEN_ENV, token)  # the instances inherit it; this process's clients send it
    pd_ports = [free_port(), free_port()]
    pair = cluster.pair("tiny", "tcp", max_model_len=MAX_LEN, prefill_args=["--pd-comm-port", str(pd_ports[0])],
                        decode_args=["--pd-comm-port", str(pd_ports[1])]).wait_ready()
    engine = RemoteEngine(pair.decode.endpoint)
    try:
        engine.add_request([5, 6, 7, 8], SamplingParams(max_tokens=6, temperature=0), "with-token")
        ok = engine.drain(30.0)["with-token"]
    finally:
        engine.close()
    assert ok.error is None and len(ok.token_ids) == 6, pair.logs()  # prefill <-> decode traffic carried it too

    ports = {"engine-worker-queue": [pair.prefill.engine_worker_queue_port, pair.decode.engine_worker_queue_port],
             "cache-queue": [pair.prefill.cache_queue_port, pair.decode.cache_queue_port], "pd-comm": pd_ports}
    for name, numbers in ports.items():
        for port in numbers:
            endpoint = f"tcp://127.0.0.1:{port}"
            for wrong in (b"", b"not-the-token"):
                assert ping(endpoint, timeout_s=0.5, token=wrong) is None, f"{name} answered token {wrong!r}"
            engine = RemoteEngine(endpoint, token=b"not-the-token")
            try:
                engine.add_request([5, 6, 7], SamplingParams(max_tokens=2), "intruder")
                assert not engine.drain(0.5), f"the {name} port served a request with a wrong token"
            finally:
                engine.close()
    for proc in (pair.prefill, pair.decode):
        log = proc.log_tail(10_000)
        for name in ports:
            assert f"on the {name} port: no cluster token, or a wrong one" in log, (name, proc.role, log[-2000:])
    assert ping(pair.decode.endpoint) is not None and ping(pair.prefill.endpoint) is not None
    pair.wait_idle()


def test_the_api_server_gives_its_instance_the_token_in_the_environment_not_the_command_line(servers):
    token = "api-secret-token"
    server = servers.start("mixed", "tiny", ["--device", "cpu", "--max-model-len", str(MAX_LEN),
                                             "--cluster-token", token]).wait_ready()
    instance = psutil.Process(server.instance_pid())
    assert token not in " ".join(instance.cmdline())
    assert instance.environ().get(TOKEN_ENV) == token
    answer = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3},
                        timeout=30.0)
    assert answer.status_code == 200, answer.text
    assert ping(server.endpoint, timeout_s=0.5, token=b"") is None  # the instance wants the token
    assert ping(server.endpoint, timeout_s=2.0, token=token.encode()) is not None


# --- never pickle ----------------------------------------------------------------------------------------


class _Planted:
    """Unpickling this creates `path`: proof that something unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mknod, (self.path,))


def test_pickle_planted_on_every_port_and_in_every_redis_key_is_refused(cluster, redis_server, tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Planted(str(marker)))
    topic = new_topic()
    pd_ports = [free_port(), free_port()]
    prefill = cluster.start("prefill", "tiny", splitwise_args(redis_server, topic, max_model_len=MAX_LEN,
                                                             extra=["--pd-comm-port", str(pd_ports[0])]))
    decode = cluster.start("decode", "tiny", splitwise_args(redis_server, topic, max_model_len=MAX_LEN,
                                                           extra=["--pd-comm-port", str(pd_ports[1])]))
    for proc in (prefill, decode):
        proc.wait_ready(120)
    ctx = zmq.Context()
    try:
        for port in (prefill.engine_worker_queue_port, prefill.cache_queue_port, decode.engine_worker_queue_port,
                     decode.cache_queue_port, *pd_ports):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.connect(f"tcp://127.0.0.1:{port}")
            sock.send(payload)
            sock.send_multipart([payload, payload])
            sock.send_multipart([encode(Ping()), payload])  # a good message with a pickle behind it
            sock.close()
    finally:
        ctx.term()
    r, keys = redis_server.client(), Keys(topic)
    deadline = time.monotonic() + 30
    while len(nodes := [k.decode() for k in r.hkeys(keys.cluster)]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for node in nodes:
        r.lpush(keys.inbox(node), payload)
        r.lpush(keys.results(node), payload)
    r.hset(keys.cluster, "planted@nowhere:1", payload)
    for proc in (prefill, decode):
        deadline = time.monotonic() + 10
        while "dropped an entry of its Redis inbox list" not in proc.log_tail(10_000) and proc.role == "decode":
            assert time.monotonic() < deadline, proc.log_tail(30)
            time.sleep(0.05)
    deadline = time.monotonic() + 10
    while r.hexists(keys.cluster, "planted@nowhere:1"):  # the next heartbeat drops the bad entry
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for proc in (prefill, decode):
        log = proc.log_tail(10_000)
        assert "dropped an entry of its Redis results list" in log, log[-2000:]
        assert "refused" in log and "malformed" in log, log[-2000:]
    assert not marker.exists(), "something unpickled a payload"
    after = short_request(prefill.endpoint, "after")
    assert after.error is None and len(after.token_ids) == 4
    wait_idle({"prefill": prefill.endpoint, "decode": decode.endpoint}, 15.0)


UNSAFE_CALLS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "torch.load", "cloudpickle.loads", "dill.loads",
                "marshal.loads", "recv_pyobj", "recv_serialized", "shelve.open", "broadcast_object_list",
                "recv_object_list", "scatter_object_list", "all_gather_object", "gather_object"}


def test_no_module_that_reads_sockets_or_redis_calls_a_pickle_loader():
    root = Path(pdlab.__file__).parent
    found = []
    for package in ("cluster", "entrypoints", "transfer", "engine"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call):
                    name = ast.unparse(node.func)
                    if any(name == call or name.endswith("." + call) for call in UNSAFE_CALLS):
                        found.append(f"{path.relative_to(root)}:{node.lineno}: {name}")
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                    if any(n and n.split(".")[0] in ("pickle", "cloudpickle", "dill", "shelve") for n in names):
                        found.append(f"{path.relative_to(root)}:{node.lineno}: imports {names}")
    assert not found, "pickle on a network path:\n" + "\n".join(found)
