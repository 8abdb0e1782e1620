"""What the disaggregated-pair tests share: workloads, serving them through a decode instance, and the check
that a pair's tokens are the colocated engine's."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

from pdlab import SamplingParams
from pdlab.cluster.client import RemoteEngine
from pdlab.engine.outputs import RequestOutput

TINY_LEN = 512  # --max-model-len of the tiny pairs


def tiny_pairs_of(module_cluster, protocols: Sequence[str]) -> dict:
    """A tiny prefill + decode pair per protocol, ready. A small decode cache (a sequence needs up to 32
    blocks), so that blocks are reused and requests queue."""
    pairs = {protocol: module_cluster.pair("tiny", protocol, max_model_len=TINY_LEN,
                                           prefill_args=["--max-num-batched-tokens", "16"],
                                           decode_args=["--num-gpu-blocks", "96"])
             for protocol in protocols}
    for pair in pairs.values():
        pair.wait_ready()
    return pairs


def random_prompts(lengths: list[int], seed: int, vocab: int = 512) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def sampling(kind: str, n: int, max_tokens: int) -> list[SamplingParams]:
    """Greedy or seeded sampling (a seed per request); every other request may stop at EOS."""
    if kind == "greedy":
        return [SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=i % 2 == 0) for i in range(n)]
    return [SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, top_k=40, seed=1000 + i,
                           ignore_eos=i % 2 == 0) for i in range(n)]


def serve(endpoint: str, prompts: list[list[int]], params: list[SamplingParams], num_upfront: int | None = None,
          timeout_s: float = 120.0) -> tuple[dict[str, RequestOutput], int]:
    """Submit `num_upfront` requests at once, then the others one at a time, each after a step that
    streamed tokens, as soon as another request is decoding. Returns the finished outputs by id ("r{i}")
    and how many late arrivals found a request decoding."""
    num_upfront = len(prompts) // 2 if num_upfront is None else num_upfront
    engine = RemoteEngine(endpoint)
    outs: dict[str, RequestOutput] = {}
    num_overlapped = 0
    try:
        for i in range(num_upfront):
            engine.add_request(prompts[i], params[i], f"r{i}")
        num_submitted = num_upfront
        deadline = time.monotonic() + timeout_s
        while (num_submitted < len(prompts) or engine.has_unfinished()) and time.monotonic() < deadline:
            advanced = engine.step()
            for out in advanced:
                if out.finished:
                    outs[out.request_id] = out
            decoding = any(o.token_ids and not o.finished for o in engine.pending.values())
            if num_submitted < len(prompts) and ((advanced and decoding) or not engine.has_unfinished()):
                num_overlapped += decoding
                engine.add_request(prompts[num_submitted], params[num_submitted], f"r{num_submitted}")
                num_submitted += 1
    finally:
        engine.close()
    return outs, num_overlapped


def pump(engine: RemoteEngine, outs: dict[str, RequestOutput]) -> None:
    """One client step; keep the outputs that finished."""
    for out in engine.step():
        if out.finished:
            outs[out.request_id] = out


def collect(engine: RemoteEngine, outs: dict[str, RequestOutput], timeout_s: float) -> None:
    """Step until every submitted request has finished (or the time is up)."""
    deadline = time.monotonic() + timeout_s
    while engine.has_unfinished() and time.monotonic() < deadline:
        pump(engine, outs)


def assert_same_tokens(got: dict[str, RequestOutput], want: list[RequestOutput], pair, ids=None) -> None:
    ids = ids or [f"r{i}" for i in range(len(want))]
    missing = [rid for rid in ids if rid not in got]
    assert not missing, f"requests never finished: {missing}\n{pair.logs()}"
    errors = {rid: got[rid].error for rid in ids if got[rid].error}
    assert not errors, f"requests failed: {errors}\n{pair.logs()}"
    diff = [(rid, len(w.prompt_token_ids), w.token_ids, got[rid].token_ids)
            for rid, w in zip(ids, want) if got[rid].token_ids != w.token_ids]
    assert not diff, "disaggregated tokens differ from colocated (id, prompt length, colocated, disaggregated):\n" + \
        "\n".join(map(str, diff))
    assert [got[rid].finish_reason for rid in ids] == [w.finish_reason for w in want]
    assert [got[rid].text for rid in ids] == [w.text for w in want]
