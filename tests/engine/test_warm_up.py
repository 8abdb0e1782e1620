"""The engine's warm-up (run at start-up on CUDA): the step kinds serving runs, leaving no trace."""

from __future__ import annotations

from pdlab.engine.config import EngineConfig
from pdlab.engine.engine import LLMEngine
from pdlab.sampling_params import SamplingParams


def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(model="tiny", device="cpu", dtype="float32", num_blocks=64, block_size=4,
                                  max_num_batched_tokens=32, max_model_len=96, seed=3))


def test_warm_up_runs_prefill_decode_and_mixed_steps_and_leaves_the_engine_as_it_was():
    warm, cold = engine(), engine()
    free = warm.block_manager.num_free_blocks
    kinds = []
    real_launch = warm.runner.launch

    def launch(batch, push_plan=None, after=None):
        prefill = any(item.num_tokens > 1 for item in batch.items)
        decode = any(item.num_tokens == 1 for item in batch.items)
        kinds.append("mixed" if prefill and decode else "prefill" if prefill else "decode")
        return real_launch(batch, push_plan, after)

    warm.runner.launch = launch
    warm.warm_up()
    assert {"prefill", "decode", "mixed"} <= set(kinds)
    assert warm.block_manager.num_free_blocks == free
    assert not warm.has_unfinished() and not warm.scheduler.requests
    # The requests after it get the seeds and tokens they would have got without it.
    params = SamplingParams(max_tokens=5, temperature=1.0, ignore_eos=True)
    a = warm.add_request([5, 6, 7], params, "a")
    b = cold.add_request([5, 6, 7], params, "b")
    assert a.seed == b.seed
    while warm.has_unfinished():
        warm.step()
    while cold.has_unfinished():
        cold.step()
    assert a.output_token_ids == b.output_token_ids
