"""Async scheduling (`EngineConfig.async_scheduling`): the next decode step is queued before the host has the
running step's tokens, and the outputs are the synchronous engine's, token for token (CPU here; on a GPU too,
where the queued step really overlaps the host's work)."""

from __future__ import annotations

import pytest
import torch

from pdlab.engine.config import EngineConfig
from pdlab.engine.engine import LLMEngine
from pdlab.sampling_params import SamplingParams

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _engine(device: str, async_scheduling: bool, **overrides) -> LLMEngine:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    config = dict(model="tiny", device=device, dtype="float32" if device == "cpu" else "bfloat16", max_num_seqs=8,
                  num_blocks=64, block_size=8, max_model_len=160, async_scheduling=async_scheduling)
    return LLMEngine(EngineConfig(**{**config, **overrides}))


def _serve(engine: LLMEngine, requests, abort_at: dict[str, int] | None = None, late: dict[int, tuple] | None = None):
    """Run `requests` (id, prompt, params) to the end; abort some after n steps, add some at step n.
    Returns ({id: (tokens, finish reason, logprobs)}, steps taken, queued-ahead steps)."""
    for rid, prompt, params in requests:
        engine.add_request(prompt, params, rid)
    done, steps, ahead = {}, 0, 0
    while engine.has_unfinished() or late:
        for rid, prompt, params in (late or {}).pop(steps, ()):
            engine.add_request(prompt, params, rid)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (out.token_ids, out.finish_reason, out.logprobs)
        ahead += engine._in_flight is not None and engine._in_flight.batch.kind == "decode"
        steps += 1
        for rid, at in (abort_at or {}).items():
            if at == steps:
                out = engine.abort(rid)
                if out is not None:
                    done[rid] = (out.token_ids, out.finish_reason, out.logprobs)
        assert steps < 500
    engine.block_manager.check_invariants(engine.scheduler.live_requests())
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # every block back
    return done, steps, ahead


def _requests(stop_token: int | None = None):
    greedy = dict(temperature=0, ignore_eos=True)
    return [
        ("short", [5, 9, 11, 13], SamplingParams(max_tokens=3, **greedy)),
        ("long", [7, 3, 2, 9] * 6, SamplingParams(max_tokens=40, **greedy)),
        ("sampled", [4, 8, 15, 16, 23, 42], SamplingParams(max_tokens=25, temperature=0.9, top_p=0.9, seed=7,
                                                            ignore_eos=True)),
        ("logprobs", [1, 2, 3], SamplingParams(max_tokens=12, temperature=0, logprobs=2, ignore_eos=True)),
        ("stops", [6, 6, 6, 1], SamplingParams(max_tokens=30, temperature=1.0, seed=1, ignore_eos=True,
                                               stop_token_ids=[] if stop_token is None else [stop_token])),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_async_scheduling_gives_the_synchronous_engines_tokens_and_queues_decode_steps_ahead(device):
    sync, _, sync_ahead = _serve(_engine(device, False), _requests())
    # A stop token the "stops" request samples midway: async scheduling has already queued its next step,
    # whose token must be thrown away.
    stop = sync["stops"][0][10]
    sync, sync_steps, _ = _serve(_engine(device, False), _requests(stop))
    assert sync["stops"][1] == "stop" and len(sync["stops"][0]) <= 11
    late = {4: [("late", [3, 1, 4, 1, 5], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))]}
    sync_late, _, _ = _serve(_engine(device, False), _requests(stop), late={**late})
    engine = _engine(device, True)
    got, steps, ahead = _serve(engine, _requests(stop))
    assert got.keys() == sync.keys()
    for rid in sync:
        assert got[rid][:2] == sync[rid][:2], rid
    for want, have in zip(sync["logprobs"][2], got["logprobs"][2]):
        assert want.keys() == have.keys()
        assert all(abs(want[t] - have[t]) < 1e-4 for t in want)
    assert sync_ahead == 0 and ahead >= 20  # most decode steps were queued behind the running one
    assert steps <= sync_steps + 2
    # The same engine again, with a request arriving mid-run (admitted in a step queued ahead).
    got_late, _, _ = _serve(engine, [(f"{r}-2", p, s) for r, p, s in _requests(stop)], late={**late})
    assert {rid.removesuffix("-2"): v[:2] for rid, v in got_late.items()} == {r: v[:2] for r, v in sync_late.items()}


def test_an_abort_while_a_step_is_queued_ahead_frees_its_blocks_and_loses_nothing_else():
    sync, _, _ = _serve(_engine("cpu", False), _requests(), abort_at={"long": 7})
    got, _, _ = _serve(_engine("cpu", True), _requests(), abort_at={"long": 7})
    assert got["long"][1] == "abort"
    assert {r: v[:2] for r, v in got.items() if r != "long"} == {r: v[:2] for r, v in sync.items() if r != "long"}


def test_no_step_is_queued_ahead_when_blocks_are_short_and_preemption_gives_the_synchronous_tokens():
    # 14 blocks of 8 tokens for five requests that need up to 8 each: the scheduler preempts; the async engine
    # must leave those steps to it.
    requests = [(f"r{i}", [3 + i] * 20, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
                for i in range(5)]
    sync, _, _ = _serve(_engine("cpu", False, num_blocks=14, max_model_len=100), requests)
    got, _, _ = _serve(_engine("cpu", True, num_blocks=14, max_model_len=100), requests)
    assert {r: v[:2] for r, v in got.items()} == {r: v[:2] for r, v in sync.items()}
