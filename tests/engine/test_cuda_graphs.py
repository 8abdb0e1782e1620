"""Decode steps replayed from CUDA graphs give the tokens eager steps give (GPU), and what decides it (CPU)."""

from __future__ import annotations

import random

import pytest
import torch

from pdlab import LLM, SamplingParams
from pdlab.models.attention import SeqSlice
from pdlab.engine.cuda_graphs import batch_sizes
from pdlab.engine.kv_io import Push
from pdlab.engine.model_runner import StepInputs


def test_captured_sizes_cover_every_batch_up_to_max_num_seqs():
    assert batch_sizes(1) == [1]
    assert batch_sizes(64)[-1] == 64 and batch_sizes(64)[0] == 1
    assert batch_sizes(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100]


def test_only_decode_steps_without_transfers_replay():
    class Graphs:  # DecodeGraphs.can_run on a stand-in: no GPU needed
        max_batch, max_blocks = 8, 4

    from pdlab.engine.cuda_graphs import DecodeGraphs

    can_run = DecodeGraphs.can_run.__get__(Graphs())
    decodes = StepInputs([5, 6], [10, 3], [0, 1], [SeqSlice(0, 1, 11, [1]), SeqSlice(1, 1, 4, [2])], [0, 1])
    assert can_run(decodes)
    chunk = StepInputs([5, 6, 7], [0, 1, 2], [0, 1, 2], [SeqSlice(0, 3, 3, [1])], [2])
    assert not can_run(chunk)
    decodes.pushes = [Push("r", 0, [1], [2])]
    assert not can_run(decodes)
    long = StepInputs([5], [70], [0], [SeqSlice(0, 1, 71, [1, 2, 3, 4, 5])], [0])
    assert not can_run(long)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_graph_replays_give_the_eager_tokens(backend):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randrange(1, 200))] for _ in range(19)]  # pads to 24
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True) if i % 2 else
              SamplingParams(max_tokens=24, temperature=0.8, top_k=20, seed=i, ignore_eos=True) for i in range(19)]
    kw = dict(dtype="float32", max_model_len=512, num_blocks=1024, max_num_seqs=32, attention_backend=backend)
    with LLM("tiny-qwen3", **kw) as graphed, LLM("tiny-qwen3", enforce_eager=True, **kw) as eager:
        assert graphed.engine.runner.graphs is not None
        warm_up_replays = graphed.engine.runner.graphs.num_replays  # the start-up warm-up's
        got = [o.token_ids for o in graphed.generate(prompts, params)]
        want = [o.token_ids for o in eager.generate(prompts, params)]
        assert graphed.engine.runner.graphs.num_replays > warm_up_replays
        assert eager.engine.runner.graphs is None
    assert got == want
