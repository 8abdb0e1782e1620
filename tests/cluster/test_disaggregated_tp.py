"""Tensor-parallel prefill and decode instances (gloo ranks on the CPU): rank r hands its KV heads to rank r.

The same tokens as the colocated engine over ipc (each rank's decode cache in its own shared-memory file);
mismatched sizes fail the request with a message that says so; tcp, which only rank 0 could carry, is refused
at start-up.
"""

from __future__ import annotations

import random

from pdlab import LLM, SamplingParams
from pdlab.cluster.client import RemoteEngine

from .conftest import instance_args, short_request

MAX_LEN = 256


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(1, 120))] for _ in range(n)]


def pair(cluster, prefill_tp: int, decode_tp: int, protocol: str = "ipc"):
    prefill = cluster.start("prefill", "tiny", instance_args(protocol, MAX_LEN, 3.0, [
        "--tensor-parallel-size", str(prefill_tp), "--max-num-batched-tokens", "32"]))
    decode = cluster.start("decode", "tiny", instance_args(protocol, MAX_LEN, 3.0, [
        "--tensor-parallel-size", str(decode_tp), "--innode-prefill-ports", str(prefill.engine_worker_queue_port)]))
    return prefill, decode


def test_tp2_prefill_and_tp2_decode_give_the_colocated_tokens(cluster):
    prefill, decode = pair(cluster, 2, 2)
    for proc in (prefill, decode):
        proc.wait_ready(120)
    ps = prompts(10, seed=1)
    params = [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True) if i % 2 else
              SamplingParams(max_tokens=16, temperature=0.9, top_k=30, seed=i, ignore_eos=True) for i in range(10)]
    engine = RemoteEngine(decode.endpoint)
    try:
        for i, (p, s) in enumerate(zip(ps, params)):
            engine.add_request(p, s, f"r{i}")
        got = engine.drain(120.0)
    finally:
        engine.close()
    with LLM("tiny", device="cpu", max_model_len=MAX_LEN) as llm:
        want = llm.generate(ps, params)
    assert sorted(got) == [f"r{i}" for i in range(10)], decode.log_tail()
    assert all(got[f"r{i}"].error is None for i in range(10)), {k: o.error for k, o in got.items()}
    assert [got[f"r{i}"].token_ids for i in range(10)] == [w.token_ids for w in want]


def test_mismatched_tensor_parallel_sizes_fail_the_request_saying_so(cluster):
    prefill, decode = pair(cluster, 2, 1)
    for proc in (prefill, decode):
        proc.wait_ready(120)
    out = short_request(decode.endpoint, "x")
    assert out.finish_reason == "error" and "tensor-parallel size 1" in out.error and "must be equal" in out.error


def test_tcp_cannot_serve_a_tensor_parallel_decode_and_says_so_at_start_up(cluster):
    proc = cluster.start("decode", "tiny", instance_args("tcp", MAX_LEN, 3.0, [
        "--tensor-parallel-size", "2", "--innode-prefill-ports", "1"]))
    assert proc.proc.wait(60) == 2
    assert "tcp cannot move the KV of a tensor-parallel instance" in proc.log_tail()
