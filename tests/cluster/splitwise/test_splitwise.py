"""Instances as separate processes behind the splitwise scheduler on a real Redis server.

What FastDeploy's multi-machine mode promises, and what pdlab adds: requests
entering any instance are served by some prefill + decode pair with the same
tokens as colocated serving; a decode instance killed with -9 loses no request
(its requests are re-dispatched and finish with the same tokens) and leaves
the cluster hash within the heartbeat timeout; requests past their TTL end
with an error and free their blocks; Redis missing at start-up is a clear
error, and Redis going away mid-run ends requests with an error, never a hang,
after which the instances come back by themselves.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdlab import LLM, SamplingParams
from pdlab.cluster.client import RemoteEngine, ping
from pdlab.cluster.launch import InstanceProcess, free_port
from pdlab.cluster.splitwise.keys import Keys
from pdlab.cluster.messages import sampling_to_msg
from pdlab.cluster.splitwise.wire import Task, decode_node, decode_update, encode
from pdlab.cluster.splitwise.router import EXPIRY_GRACE_S
from pdlab.engine.outputs import RequestOutput
from tests.margins import STALL_S

from .conftest import EXPIRE_S, HEARTBEAT_S, Hosts, RedisServer, new_topic, node_ids, splitwise_args, wait_nodes

MAX_LEN = 512


def prompts_of(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in lengths]


def params_of(kind: str, n: int, max_tokens: int) -> list[SamplingParams]:
    if kind == "greedy":
        return [SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=i % 2 == 0) for i in range(n)]
    return [SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, top_k=40, seed=500 + i,
                           ignore_eos=i % 2 == 0) for i in range(n)]


def start(cluster, role: str, server: RedisServer, topic: str, protocol: str = "tcp", **kw):
    metrics_port = free_port()
    proc = cluster.start(role, "tiny", splitwise_args(server, topic, protocol, max_model_len=MAX_LEN,
                                                      extra=["--metrics-port", str(metrics_port), *kw.pop("extra", [])],
                                                      **kw))
    proc.metrics_port = metrics_port
    return proc


def prompt_tokens_served(proc) -> float:
    text = httpx.get(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=5.0).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "pdlab:prompt_tokens_total")


def submit_all(engines: list[RemoteEngine], prompts, params) -> dict[str, RequestOutput]:
    """Request i goes to engines[i % len(engines)]; wait for all."""
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engines[i % len(engines)].add_request(prompt, p, f"r{i}")
    outs: dict[str, RequestOutput] = {}
    for engine in engines:
        outs.update(engine.drain(120.0))
    return outs


def logs(procs) -> str:
    return "\n".join(f"--- {p.role} {p.engine_worker_queue_port} ---\n{p.log_tail(25)}" for p in procs)


def assert_same(got: dict[str, RequestOutput], want: list[RequestOutput], procs) -> None:
    ids = [f"r{i}" for i in range(len(want))]
    missing = [i for i in ids if i not in got]
    assert not missing, f"never finished: {missing}\n{logs(procs)}"
    errors = {i: got[i].error for i in ids if got[i].error}
    assert not errors, f"failed: {errors}\n{logs(procs)}"
    diff = [(i, w.token_ids, got[i].token_ids) for i, w in zip(ids, want) if got[i].token_ids != w.token_ids]
    assert not diff, "tokens differ from colocated (id, colocated, splitwise):\n" + "\n".join(map(str, diff))
    assert [got[i].text for i in ids] == [w.text for w in want]


def wait_idle(procs, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        pongs = [ping(p.endpoint) for p in procs]
        if all(p is not None and p.num_free_blocks == p.num_blocks and p.num_held == 0 and p.num_running == 0
               and p.num_waiting == 0 for p in pongs):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"not idle after {timeout_s:.0f} s (leaked blocks or requests): {pongs}\n{logs(procs)}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def tiny_llm() -> LLM:
    return LLM("tiny", device="cpu", max_model_len=MAX_LEN)


# --- 1. two prefill and two decode instances ------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["tcp", "ipc"])
def test_two_prefills_and_two_decodes_serve_any_entry_with_colocated_tokens(cluster, redis_server, tiny_llm,
                                                                            protocol: str):
    topic = new_topic()
    procs = [start(cluster, role, redis_server, topic, protocol) for role in ("prefill", "prefill", "decode", "decode")]
    for proc in procs:
        proc.wait_ready(120)
    wait_nodes(redis_server, topic, 4)
    engines = [RemoteEngine(p.endpoint) for p in procs]  # every instance takes requests, prefills too
    try:
        for kind in ("greedy", "seeded"):
            prompts = prompts_of([1, 3, 7, 12, 20, 33, 50, 64, 90, 130, 5, 40, 17, 75, 110, 9], seed=len(kind))
            params = params_of(kind, len(prompts), max_tokens=16)
            got = submit_all(engines, prompts, params)
            assert_same(got, tiny_llm.generate(prompts, params), procs)
    finally:
        for engine in engines:
            engine.close()
    served = [prompt_tokens_served(p) for p in procs]
    assert all(n > 0 for n in served), f"every instance should have served some prompts: {served}"
    wait_idle(procs)
    info = {n.role for n in (decode_node(v) for v in redis_server.client().hvals(Keys(topic).cluster))}
    assert info == {"prefill", "decode"}


def start_on(cluster, hosts: Hosts, i: int, role: str, server: RedisServer, topic: str, log_dir) -> InstanceProcess:
    """An instance inside namespace i, bound to its address, with Redis at the bridge's."""
    host, ewq, cache = hosts.address(i), free_port(), free_port()
    argv = [*hosts.run_in(i), sys.executable, "-m", "pdlab.cluster.instance", "--splitwise-role", role,
            "--model", "tiny", "--engine-worker-queue-port", str(ewq), "--cache-queue-port", str(cache),
            "--host", host, *splitwise_args(server, topic, "ipc", max_model_len=MAX_LEN, scheduler_host=hosts.gateway)]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{role}-{i}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    instance = InstanceProcess(role, ewq, cache, proc, log_path, host, argv)
    cluster.procs.append(instance)
    return instance


def test_instances_on_two_hosts_move_the_kv_over_tcp_across_a_real_interface(cluster, hosts, redis_servers, tmp_path,
                                                                              tiny_llm):
    # Reachable from other hosts, so protected by a password (--scheduler-password).
    server = redis_servers(bind=("127.0.0.1", hosts.gateway), password="s3cret-pd")
    try:
        topic = new_topic()
        # Both offer ipc (and tcp); on different hosts the pair must use tcp.
        prefill = start_on(cluster, hosts, 0, "prefill", server, topic, tmp_path / "logs")
        decode = start_on(cluster, hosts, 1, "decode", server, topic, tmp_path / "logs")
        for proc in (prefill, decode):
            proc.wait_ready(120)
        wait_nodes(server, topic, 2)
        nodes = {decode_node(v).role: decode_node(v) for v in server.client().hvals(Keys(topic).cluster)}
        assert nodes["prefill"].host == hosts.address(0) and nodes["decode"].host == hosts.address(1)
        assert nodes["decode"].protocols == ["ipc", "tcp"]
        prompts = prompts_of([3, 17, 40, 90, 150], seed=11)
        params = params_of("seeded", len(prompts), max_tokens=16)
        engines = [RemoteEngine(decode.endpoint), RemoteEngine(prefill.endpoint)]
        try:
            got = submit_all(engines, prompts, params)
        finally:
            for engine in engines:
                engine.close()
        assert_same(got, tiny_llm.generate(prompts, params), [prefill, decode])
        wait_idle([prefill, decode])
    finally:
        server.kill()


# --- 2. a decode instance dies ---------------------------------------------------------------------------


def test_kill_9_of_a_decode_re_dispatches_its_requests_and_drops_it_from_redis(cluster, redis_server, tiny_llm):
    topic = new_topic()
    # Two sequences at a time per decode instance: most requests wait in a decode's queue.
    decode_args = ["--max-num-seqs", "2"]
    prefill = start(cluster, "prefill", redis_server, topic)
    decodes = [start(cluster, "decode", redis_server, topic, extra=decode_args) for _ in range(2)]
    for proc in (prefill, *decodes):
        proc.wait_ready(120)
    wait_nodes(redis_server, topic, 3)
    prompts = prompts_of([8, 30, 12, 60, 5, 44, 21, 70, 15, 33, 9, 50], seed=7)
    params = params_of("greedy", len(prompts), max_tokens=96)
    engine = RemoteEngine(prefill.endpoint)  # the router that sees the decode die
    outs: dict[str, RequestOutput] = {}
    try:
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            engine.add_request(prompt, p, f"r{i}")
        # Kill the decode instance as soon as requests stream: it has some running and more queued.
        while not any(o.token_ids for o in engine.pending.values()):
            for out in engine.step():
                assert not out.finished, f"{out.request_id} finished before any other streamed: {out.error}"
        # The doomed one is the decode holding more of them (the router's picks are random among near-ties).
        held = {proc.endpoint: (pong := ping(proc.endpoint)).num_running + pong.num_waiting for proc in decodes}
        doomed, survivor = sorted(decodes, key=lambda proc: -held[proc.endpoint])
        doomed_id = f"decode@127.0.0.1:{doomed.engine_worker_queue_port}"
        assert doomed_id in node_ids(redis_server, topic)
        assert held[doomed.endpoint] >= 3, f"the doomed decode should hold requests: {held}"
        doomed.kill()
        killed_s = time.monotonic()
        outs.update(engine.drain(60.0))
    finally:
        engine.close()
    assert_same(outs, tiny_llm.generate(prompts, params), [prefill, survivor])
    while doomed_id in node_ids(redis_server, topic):
        assert time.monotonic() - killed_s < EXPIRE_S + STALL_S, f"{doomed_id} is still registered"
        time.sleep(0.05)
    # Removed by a live node once its last heartbeat was older than the timeout, as that node's clock measured it
    # (it checks at every heartbeat of its own).
    removals = re.findall(rf"removed {re.escape(doomed_id)} from the scheduler: no heartbeat for ([0-9.]+) s",
                          prefill.log_tail(400) + survivor.log_tail(400))
    assert len(removals) == 1, logs([prefill, survivor])
    assert EXPIRE_S <= float(removals[0]) < EXPIRE_S + HEARTBEAT_S + STALL_S, removals
    assert "re-dispatching" in prefill.log_tail(200), "the router should have re-dispatched requests"
    wait_idle([prefill, survivor])


def test_kill_9_of_a_prefill_mid_prompt_sends_its_requests_to_another_prefill(cluster, redis_server, tiny_llm):
    topic = new_topic()
    # Small prefill steps: a long prompt takes many steps, so the kill lands mid-prompt.
    slow = ["--max-num-batched-tokens", "16"]
    prefills = [start(cluster, "prefill", redis_server, topic, extra=slow) for _ in range(2)]
    decode = start(cluster, "decode", redis_server, topic)
    for proc in (*prefills, decode):
        proc.wait_ready(120)
    wait_nodes(redis_server, topic, 3)
    prompts = prompts_of([300, 280, 260, 240, 220, 200], seed=5)
    params = params_of("greedy", len(prompts), max_tokens=8)
    engine = RemoteEngine(decode.endpoint)
    try:
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            engine.add_request(prompt, p, f"r{i}")
        # The doomed one holds two prompts or more (the router's picks are random among near-ties): whenever
        # the kill lands, one of them is still to be computed there.
        deadline = time.monotonic() + 30
        while True:
            held = {p.endpoint: (pong.num_running + pong.num_waiting if (pong := ping(p.endpoint)) else 0)
                    for p in prefills}
            if max(held.values()) >= 2:
                break
            engine.step()
            assert time.monotonic() < deadline, f"no prefill got two prompts: {held}"
        doomed, survivor = sorted(prefills, key=lambda proc: -held[proc.endpoint])
        doomed.kill()
        outs = engine.drain(60.0)
    finally:
        engine.close()
    assert_same(outs, tiny_llm.generate(prompts, params), [survivor, decode])
    assert "re-dispatching" in decode.log_tail(200)
    wait_idle([survivor, decode])


# --- 3. TTL ---------------------------------------------------------------------------------------------


def test_requests_past_their_ttl_end_with_an_error_and_free_their_blocks(cluster, redis_server):
    topic = new_topic()
    ttl_s = 1.5
    long_len = 2048  # long enough that no request can finish within the TTL on a CPU
    kw = dict(max_model_len=long_len, ttl_s=ttl_s)
    prefill = cluster.start("prefill", "tiny", splitwise_args(redis_server, topic, **kw))
    decode = cluster.start("decode", "tiny", splitwise_args(redis_server, topic, extra=["--max-num-seqs", "1"], **kw))
    for proc in (prefill, decode):
        proc.wait_ready(120)
    wait_nodes(redis_server, topic, 2)
    engine = RemoteEngine(decode.endpoint)
    try:
        params = SamplingParams(max_tokens=long_len - 64, temperature=0, ignore_eos=True)
        start_s = time.monotonic()
        for i, prompt in enumerate(prompts_of([10, 20, 30], seed=3)):  # one runs, two wait for its slot
            engine.add_request(prompt, params, f"r{i}")
        outs = engine.drain(ttl_s + EXPIRY_GRACE_S + 2 * STALL_S)
    finally:
        engine.close()
    assert sorted(outs) == ["r0", "r1", "r2"], logs([prefill, decode])
    assert all(o.finish_reason == "error" and "expired" in o.error and "--scheduler-ttl" in o.error
               for o in outs.values()), {k: (o.finish_reason, o.error) for k, o in outs.items()}
    assert any(o.token_ids for o in outs.values()), "the running request had streamed tokens before it expired"
    # Not before the TTL (counted from the request's arrival, after start_s); by the router's grace after it at
    # the latest.
    for o in outs.values():
        assert ttl_s <= o.finish_time_s - start_s < ttl_s + EXPIRY_GRACE_S + STALL_S
    wait_idle([prefill, decode])


def test_a_task_naming_a_protocol_the_decode_lacks_ends_at_once_with_retry(cluster, redis_server):
    """A router's task that asks a tcp-only decode for KV over rdma (a stale view of the decode, say) is
    answered at once with an error marked retry, so that the router sends it elsewhere; nothing stays."""
    topic = new_topic()
    decode = start(cluster, "decode", redis_server, topic, "tcp")
    decode.wait_ready(120)
    (node,) = wait_nodes(redis_server, topic, 1)
    keys, r = Keys(topic), redis_server.client()
    task = Task("r0#0", [5, 6, 7, 8], sampling_to_msg(SamplingParams(max_tokens=4)), seed=0, reply_to="test-router",
                deadline_ts=time.time() + 60, prefill_id="p0", prefill_endpoint="tcp://127.0.0.1:1", protocol="rdma")
    r.lpush(keys.inbox(node), encode(task))
    popped = r.brpop([keys.results("test-router")], timeout=10 + STALL_S)
    assert popped is not None, f"no answer within {10 + STALL_S:.0f} s\n{logs([decode])}"
    update = decode_update(popped[1])
    assert update.finished and update.retry and update.finish_reason == "error"
    assert "KV over 'rdma'" in update.error and "receives over tcp" in update.error
    assert r.llen(keys.results("test-router")) == 0  # answered once, not again at every tick
    wait_idle([decode])


# --- 4. Redis missing or going away -------------------------------------------------------------------------


def test_an_instance_without_redis_exits_2_naming_it(tmp_path):
    port = free_port()  # nothing listens there
    proc = subprocess.run(
        [sys.executable, "-m", "pdlab.cluster.instance", "--splitwise-role", "decode", "--model", "tiny",
         "--engine-worker-queue-port", str(free_port()), "--cache-queue-port", str(free_port()),
         "--device", "cpu", "--scheduler-name", "splitwise", "--scheduler-port", str(port)],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"cannot reach the splitwise scheduler's Redis at 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_redis_going_away_ends_requests_with_an_error_then_the_instances_come_back(cluster, redis_servers):
    server = redis_servers()
    try:
        topic = new_topic()
        mixed = cluster.start("mixed", "tiny", splitwise_args(server, topic, max_model_len=2048))
        mixed.wait_ready(120)
        wait_nodes(server, topic, 1)
        engine = RemoteEngine(mixed.endpoint)
        try:
            params = SamplingParams(max_tokens=1900, temperature=0, ignore_eos=True)
            for i, prompt in enumerate(prompts_of([10, 20], seed=4)):
                engine.add_request(prompt, params, f"r{i}")
            while not any(o.token_ids for o in engine.pending.values()):
                engine.step()
            server.kill()
            gone_s = time.monotonic()
            outs = engine.drain(EXPIRE_S + 2 * STALL_S)
            assert sorted(outs) == ["r0", "r1"], "every request ends: none hangs"
            assert all(o.finish_reason == "error" and "Redis" in o.error for o in outs.values()), \
                {k: o.error for k, o in outs.items()}
            # Given up once Redis has not answered for the timeout (counted from the last heartbeat it answered).
            assert all(o.finish_time_s - gone_s < EXPIRE_S + STALL_S for o in outs.values())
            # While Redis is down a new request fails at once, with the reason.
            engine.add_request([5, 6, 7], SamplingParams(max_tokens=4, temperature=0), "during")
            during = engine.drain(10.0)["during"]
            assert during.finish_reason == "error" and "unreachable" in during.error
            assert ping(mixed.endpoint) is not None, "the instance keeps running"

            server.start()  # the same port, empty: the instance registers again by itself
            wait_nodes(server, topic, 1, timeout_s=10.0)
            engine.add_request([5, 6, 7], SamplingParams(max_tokens=4, temperature=0), "after")
            after = engine.drain(30.0)["after"]
            assert after.error is None and len(after.token_ids) == 4
        finally:
            engine.close()
        wait_idle([mixed])
    finally:
        server.kill()


def test_a_missing_or_wrong_password_is_a_clear_error(redis_servers):
    from pdlab.cluster.splitwise.agent import SplitwiseConfig, connect
    from pdlab.errors import ConfigError

    server = redis_servers(password="right")
    try:
        with pytest.raises(ConfigError, match="needs a password"):
            connect(SplitwiseConfig(port=server.port))
        with pytest.raises(ConfigError, match="refused the password"):
            connect(SplitwiseConfig(port=server.port, password="wrong"))
        connect(SplitwiseConfig(port=server.port, password="right")).close()
    finally:
        server.kill()
