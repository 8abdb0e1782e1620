"""Steps replayed from CUDA graphs give the tokens eager steps give (GPU); what decides it, and the piecewise
graphs' pieces run in order on padded static buffers, computing what the eager forward pass does (CPU)."""

from __future__ import annotations

import random

import pytest
import torch

from pdlab import LLM, SamplingParams
from pdlab.models.attention import SeqSlice
from pdlab.engine.cuda_graphs import MixedGraphs, batch_sizes, token_sizes
from pdlab.engine.kv_io import Push
from pdlab.engine.model_runner import ModelRunner, StepInputs
from pdlab.models.kv_cache import KVCache
from pdlab.models.presets import PRESETS
from pdlab.models.transformer import Transformer
from pdlab.policy.block_manager import BlockManager
from pdlab.policy.request import Request
from pdlab.policy.scheduler import Scheduler, SchedulerConfig


def test_captured_sizes_cover_every_batch_up_to_max_num_seqs():
    assert batch_sizes(1) == [1]
    assert batch_sizes(64)[-1] == 64 and batch_sizes(64)[0] == 1
    assert batch_sizes(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100]


def test_piecewise_token_counts_go_up_to_the_cap():
    assert token_sizes(1024) == [16, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512, 576, 640, 704,
                                 768, 832, 896, 960, 1024]
    assert token_sizes(100) == [16, 32, 48, 64, 96, 100]
    assert token_sizes(8) == [8]
    assert token_sizes(2000)[-5:] == [1024, 1280, 1536, 1792, 2000]


class _Eagerly:
    """A piece in place of its graph: `replay` runs it (what a captured graph replays, without a GPU)."""

    def __init__(self, piece):
        self.replay = piece


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-qwen2"])
def test_piecewise_pieces_on_padded_buffers_compute_the_eager_forward_pass(name):
    torch.manual_seed(0)
    model = Transformer(PRESETS[name])
    model.init_random(seed=3)
    budget, block_size = 40, 8
    caches = [KVCache(model.config, 64, block_size, torch.float32, "cpu", scratch_block=True) for _ in range(2)]
    eager, piecewise = ModelRunner(model, caches[0]), ModelRunner(model, caches[1])
    mixed = MixedGraphs(piecewise, budget)
    assert mixed.sizes == [16, 32, 40]
    mixed.graphs = {size: [_Eagerly(piece) for piece in mixed.pieces(size)] for size in mixed.sizes}
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=budget, enable_chunked_prefill=True,
                                          max_model_len=256), BlockManager(64, block_size))
    rng = random.Random(1)
    for i, n in enumerate((3, 29, 57, 1, 12, 8)):
        scheduler.add(Request(str(i), [rng.randrange(3, 500) for _ in range(n)],
                              SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)))
    sizes_seen, kinds, written = set(), set(), []
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        inputs = eager.plan(batch)
        assert mixed.can_run(inputs)
        with torch.no_grad():
            want = eager.forward(inputs)
            got = model.compute_logits(mixed.run(inputs, on_kv_written=written.append)[inputs.sample_rows])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        sizes_seen.add(next(s for s in mixed.sizes if s >= len(inputs.input_ids)))
        kinds.add(tuple(sorted({min(s.q_len, 2) for s in inputs.seqs})))  # (1,): decodes, (2,): chunks, (1, 2)
        assert written == list(range(model.config.num_layers))  # each layer's KV is in before its attention
        written.clear()
        scheduler.update(batch, {item.request.request_id: int(row.argmax())
                                 for item, row in zip([it for it in batch.items if it.sample], want)}, now_s=0.0)
    assert sizes_seen == {16, 40} and kinds == {(2,), (1, 2), (1,)}  # padded or not; chunks, decodes, both
    assert mixed.num_replays > 0
    # The padding rows wrote only to the scratch block: the requests' blocks hold the same K and V.
    torch.testing.assert_close(caches[1].kv[:, :, :64], caches[0].kv[:, :, :64], atol=1e-5, rtol=1e-5)


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
    # A 256-token budget chunks the prompts: steps of chunks alone and of chunks beside decodes.
    kw = dict(dtype="float32", max_model_len=512, num_blocks=1024, max_num_seqs=32, max_num_batched_tokens=256,
              attention_backend=backend)
    with LLM("tiny-qwen3", **kw) as graphed, LLM("tiny-qwen3", enforce_eager=True, **kw) as eager:
        runner = graphed.engine.runner
        assert runner.graphs is not None and runner.mixed_graphs is not None
        warm_up_replays = runner.graphs.num_replays, runner.mixed_graphs.num_replays  # the start-up warm-up's
        got = [o.token_ids for o in graphed.generate(prompts, params)]
        want = [o.token_ids for o in eager.generate(prompts, params)]
        assert runner.graphs.num_replays > warm_up_replays[0]  # decode steps
        assert runner.mixed_graphs.num_replays > warm_up_replays[1]  # prefill chunks, alone or beside decodes
        assert eager.engine.runner.graphs is None and eager.engine.runner.mixed_graphs is None
    with LLM("tiny-qwen3", cuda_graph_max_tokens=0, **kw) as decode_only:
        assert decode_only.engine.runner.graphs is not None and decode_only.engine.runner.mixed_graphs is None
        assert [o.token_ids for o in decode_only.generate(prompts, params)] == want
    assert got == want


def test_a_negative_graph_token_cap_is_refused_by_name():
    from pdlab.errors import ConfigError

    with pytest.raises(ConfigError, match="cuda_graph_max_tokens must be >= 0"):
        LLM("tiny", device="cpu", cuda_graph_max_tokens=-1)
