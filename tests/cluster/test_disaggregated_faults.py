"""Faults of a disaggregated pair: a prefill killed mid-transfer ends its requests with an error that names it
and can be replaced on the same port; garbage and unservable tasks on the control plane are survived; a
client whose instance dies does not hang. (The acceptance criteria: test_disaggregated.py.)
"""

from __future__ import annotations

import random
import time

import msgspec
import pytest
import zmq

from pdlab import LLM, SamplingParams
from pdlab.cluster.client import RemoteEngine, ping
from pdlab.cluster.messages import (
    GenerateRequest, KVDescriptor, KVLayer, PrefillDone, PrefillFailed, PrefillTask, SamplingMsg, decode, encode,
    sampling_to_msg,
)
from pdlab.engine.outputs import RequestOutput
from pdlab.models.presets import PRESETS
from tests.cluster.serving import (
    TINY_LEN, assert_same_tokens, collect, pump, random_prompts, sampling, serve, tiny_pairs_of,
)
from tests.margins import STALL_S


@pytest.fixture(scope="module")
def tiny_pairs(module_cluster):
    return tiny_pairs_of(module_cluster, ("tcp",))


@pytest.fixture(scope="module")
def tiny_llm() -> LLM:
    return LLM("tiny", device="cpu", max_model_len=TINY_LEN)


# --- 4. a prefill killed mid-transfer ----------------------------------------------------------------


def test_prefill_killed_mid_transfer_fails_its_requests_and_can_be_replaced(cluster, tiny_llm: LLM):
    # The transfer timeout must outlast a prefill's start-up (see below): 4 s on the 2-core machine, plus the margin.
    pair = cluster.pair("tiny", "tcp", max_model_len=TINY_LEN, prefill_args=["--max-num-batched-tokens", "8"],
                        transfer_timeout_s=4.0 + STALL_S).wait_ready()
    port = pair.prefill.engine_worker_queue_port
    decode_incarnation = ping(pair.decode.endpoint).incarnation
    engine = RemoteEngine(pair.decode.endpoint)
    outs: dict[str, RequestOutput] = {}
    try:
        # Requests already decoding when the prefill dies: they have their KV and must finish normally.
        survivor_prompts = random_prompts([20, 60], seed=7)
        survivor_params = [SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)] * 2
        survivors = [engine.add_request(p, sp, f"s{i}") for i, (p, sp) in
                     enumerate(zip(survivor_prompts, survivor_params))]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(engine.pending[r].token_ids for r in survivors):
            pump(engine, outs)
        # Long prompts, 8 tokens a prefill step: the prefill is busy pushing their KV for a while.
        doomed = [engine.add_request(p, SamplingParams(max_tokens=4), f"d{i}")
                  for i, p in enumerate(random_prompts([480] * 8, seed=8))]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pong = ping(pair.prefill.endpoint, timeout_s=0.5)
            if pong is not None and pong.num_running + pong.num_waiting >= 4:
                break
        assert pong is not None and pong.num_running + pong.num_waiting >= 4, pair.logs()
        assert all(r in engine.pending for r in survivors), "the survivors should still be decoding"
        pair.prefill.kill()
        killed_s = time.monotonic()

        collect(engine, outs, timeout_s=4 * pair.transfer_timeout_s + 5)
        assert not engine.has_unfinished(), f"never finished: {list(engine.pending)}\n{pair.logs()}"
        failed = {rid: outs[rid].error for rid in doomed if outs[rid].error}
        assert len(failed) >= 3, f"requests in flight at the prefill should fail: {failed}\n{pair.logs()}"
        # The dropped connection ends them at once; had the decode missed it, the prefill's silence after the
        # transfer timeout (its last heartbeat answer came before the kill).
        last_failure_s = max(outs[rid].finish_time_s for rid in failed)
        assert last_failure_s - killed_s < pair.transfer_timeout_s + STALL_S, "failures should come within the timeout"
        for rid, error in failed.items():
            assert outs[rid].finish_reason == "error"
            assert f"prefill:{port}" in error, f"the error should name the dead prefill: {error!r}"
        for rid in set(doomed) - set(failed):  # finished their prefill before the kill
            assert outs[rid].finish_reason == "length" and len(outs[rid].token_ids) == 4
        want = tiny_llm.generate(survivor_prompts, survivor_params)
        assert_same_tokens(outs, want, pair, ids=survivors)
        decode_pong = ping(pair.decode.endpoint)
        assert decode_pong is not None and decode_pong.num_free_blocks == decode_pong.num_blocks, decode_pong
        assert decode_pong.num_held == decode_pong.num_running == decode_pong.num_waiting == 0, decode_pong

        # A new prefill on the same port takes over. Requests sent while it starts wait at the decode (blocks
        # reserved, task not sent) until it is up, within the transfer timeout; then they go to it, and their
        # transfers (24 long prompts, ~1.3 s) outlast the decode's first heartbeat to it.
        pair.prefill = cluster.restart(pair.prefill)
        prompts = random_prompts([1, 17, 64, 200] + [480] * 24, seed=9)
        params = sampling("seeded", len(prompts), max_tokens=12)
        got, _ = serve(pair.decode.endpoint, prompts, params, num_upfront=len(prompts), timeout_s=60)
        assert_same_tokens(got, tiny_llm.generate(prompts, params), pair)
        pair.wait_idle()
    finally:
        engine.close()
    assert pair.decode.proc.poll() is None, f"the decode instance died:\n{pair.logs()}"
    assert ping(pair.decode.endpoint).incarnation == decode_incarnation, "the decode instance restarted"


# --- 5. garbage on the control plane -----------------------------------------------------------------


def garbage_messages() -> list[list[bytes]]:
    rng = random.Random(10)
    request = encode(GenerateRequest("g0", [5, 6, 7], sampling_to_msg(SamplingParams(max_tokens=4))))
    layer = encode(KVLayer("g0", 0, [0, 1], "float32", (2, 2, 16, 2, 32)))
    return [
        [b""],
        [b"\x00\xffgarbage\xfe"],
        [bytes(rng.randrange(256) for _ in range(64))],
        [b"\xc1"],  # a byte msgpack never uses
        [b"\x81\xa4type\xa1\xff"],  # {"type": b"\xff"}: a tag that is not valid UTF-8
        [b"\x81\xa4type\xafGenerateRequest"],  # the right tag, no fields
        [b"\x84\xa4type\xafGenerateRequest\xaarequest_id\x05\xb0prompt_token_ids\xa1x\xa8sampling\x80"],  # wrong types
        [request[: len(request) // 2]],  # truncated
        [layer[:-3]],
        [layer],  # a header without its payload
        [layer, b"\x00" * 10],  # a payload of the wrong size, for no transfer
        [b"abc", b"def", b"ghi"],
        [encode(PrefillDone("nobody", 3))],
    ]


def test_garbage_on_the_control_plane_is_survived(tiny_pairs, tiny_llm: LLM):
    pair = tiny_pairs["tcp"]
    ctx = zmq.Context.instance()
    ports = [pair.prefill.engine_worker_queue_port, pair.prefill.cache_queue_port,
             pair.decode.engine_worker_queue_port, pair.decode.cache_queue_port]
    for port in ports:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(f"tcp://127.0.0.1:{port}")
        for frames in garbage_messages():
            sock.send_multipart(frames)
        sock.close()  # lingers until sent
    time.sleep(0.2)
    assert pair.prefill.proc.poll() is None and pair.decode.proc.poll() is None, \
        f"an instance died of garbage:\n{pair.logs()}"
    assert all(p is not None for p in pair.pongs()), pair.logs()
    prompts = random_prompts([3, 50], seed=11)
    params = sampling("greedy", 2, max_tokens=8)
    got, _ = serve(pair.decode.endpoint, prompts, params, num_upfront=2, timeout_s=30)
    assert_same_tokens(got, tiny_llm.generate(prompts, params), pair)
    pair.wait_idle()


def test_prefill_answers_tasks_it_cannot_serve_and_lives_on(tiny_pairs):
    """Well-formed tasks whose destination cannot be used: the prefill reports PrefillFailed and serves on."""
    pair = tiny_pairs["tcp"]
    ctx = zmq.Context.instance()
    inbox = ctx.socket(zmq.ROUTER)  # stands in for a decode instance's cache-queue port
    inbox.setsockopt(zmq.LINGER, 0)
    inbox_port = inbox.bind_to_random_port("tcp://127.0.0.1")
    c = PRESETS["tiny"]
    good = KVDescriptor("decode:fake", "tcp", f"tcp://127.0.0.1:{inbox_port}", c.num_layers, 64, 16, c.num_kv_heads,
                        c.head_dim, "float32")
    bad = {
        "another head_dim": msgspec.structs.replace(good, head_dim=c.head_dim * 2),
        "no shared memory": msgspec.structs.replace(good, protocol="ipc", shm_name="/nonexistent/pdlab-kv"),
        "an unknown protocol": msgspec.structs.replace(good, protocol="carrier-pigeon"),
        "a malformed endpoint": msgspec.structs.replace(good, cache_endpoint="not-an-endpoint"),  # no answer possible
    }
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(pair.prefill.endpoint)
    try:
        for i, (what, kv) in enumerate(bad.items()):
            sock.send(encode(PrefillTask(f"bad{i}", [5, 6, 7], SamplingMsg(), 1, [0], kv)))
            assert ping(pair.prefill.endpoint, timeout_s=3) is not None, \
                f"the prefill stopped answering after a task with {what}:\n{pair.logs()}"
            if kv.cache_endpoint == good.cache_endpoint:
                assert inbox.poll(3000), f"no answer to a task with {what}"
                answer = decode(inbox.recv_multipart()[-1])
                assert isinstance(answer, PrefillFailed) and answer.request_id == f"bad{i}", answer
    finally:
        sock.close()
        inbox.close()
    pair.wait_idle()


def test_a_client_does_not_hang_when_its_instance_dies(tmp_path):
    """RemoteEngine ends every pending request with an error once the instance stops answering."""
    from pdlab.cluster.client import RemoteEngine
    from pdlab.cluster.launch import start_instance
    from pdlab.sampling_params import SamplingParams

    mixed = start_instance("mixed", "tiny", tmp_path, extra_args=["--device", "cpu", "--max-model-len", "256"],
                           env={"OMP_NUM_THREADS": "1"})
    try:
        mixed.wait_ready(120)
        engine = RemoteEngine(mixed.endpoint, liveness_s=0.5)
        engine.add_request([5] * 10, SamplingParams(max_tokens=200, ignore_eos=True), "x")
        mixed.kill()
        outs = engine.drain(timeout_s=30)
        assert outs["x"].finish_reason == "error" and "stopped answering" in outs["x"].error
        engine.close()
    finally:
        mixed.stop()
