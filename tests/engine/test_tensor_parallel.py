"""Tensor parallelism on CPUs (gloo): every sharded size computes what the whole model computes.

Each test starts rank 0 here and the other ranks as `pdlab.engine.tp_worker` processes. On CPUs in
fp32 the reduction order changes the last bits only: the greedy tokens are identical and the
log-probabilities agree to 1e-4, quantized or not, as long as each shard's rows are whole wint groups
(a shard shorter than a group is quantized in smaller groups, so its weights differ from the whole
model's within the method's error). The same on GPUs (NCCL, bf16) needs two GPUs:
tests/engine/test_tensor_parallel_gpu.py.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys

import pytest
import torch
import transformers

from pdlab import LLM, SamplingParams
from pdlab.errors import ConfigError
from pdlab.lifetime import GRACE_S, POLL_S
from pdlab.models.presets import PRESETS
from pdlab.models.sharding import Shard
from tests.test_lifetime import alive, gone_within

ENGINE = dict(device="cpu", max_model_len=256, max_num_batched_tokens=32, num_blocks=128, block_size=8)
# A Qwen3 shape whose row-parallel shards (o_proj: 4 heads x 128, down_proj: 512) are multiples of the wint group
# of 128 on up to 4 ranks: every shard's groups are groups of the whole weight, so TP=n holds TP=1's quantized values.
WHOLE_GROUPS = dict(vocab_size=512, hidden_size=64, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=128, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                    tie_word_embeddings=True)


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(1, 90))] for _ in range(n)]


def run(model: str, tp: int, params: list[SamplingParams], ps: list[list[int]], **kw):
    with LLM(model, tensor_parallel_size=tp, **ENGINE, **kw) as llm:
        outs = llm.generate(ps, params)
        bm = llm.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks
        return outs


def assert_agree(want, got, max_logprob_diff: float) -> None:
    """The same tokens, the same top log-probability entries, and their values within `max_logprob_diff`."""
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for w, g in zip(want, got):
        for a, b in zip(w.logprobs, g.logprobs):
            assert a.keys() == b.keys()
            assert max(abs(a[t] - b[t]) for t in a) < max_logprob_diff


@pytest.mark.parametrize("model", ["tiny", "tiny-qwen2", "tiny-qwen3", "tiny-llama3"])
def test_tp2_gives_the_tokens_and_logprobs_of_tp1(model):
    ps = prompts(6, seed=len(model))
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3) if i % 2 else
              SamplingParams(max_tokens=12, temperature=0.9, top_k=40, seed=i, ignore_eos=True, logprobs=3)
              for i in range(len(ps))]
    assert_agree(run(model, 1, params, ps), run(model, 2, params, ps), 1e-4)


def test_tp4_replicates_kv_heads_and_still_agrees():
    # tiny has 2 KV heads: with 4 ranks each KV head lives on two of them.
    assert [Shard(PRESETS["tiny"], r, 4).kv_heads for r in range(4)] == [range(0, 1)] * 2 + [range(1, 2)] * 2
    ps = prompts(3, seed=4)
    params = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)] * 3
    assert [o.token_ids for o in run("tiny", 4, params, ps)] == [o.token_ids for o in run("tiny", 1, params, ps)]


@pytest.fixture(scope="module")
def whole_groups_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("qwen3-whole-groups")
    torch.manual_seed(0)
    config = transformers.Qwen3Config(**WHOLE_GROUPS)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("quantization", ["wint8", "wint4"])
def test_quantized_shards_give_the_tokens_and_logprobs_of_the_quantized_whole_model(whole_groups_model, quantization,
                                                                                    tp):
    ps = prompts(4, seed=9)
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3)] * len(ps)
    want = run(whole_groups_model, 1, params, ps, quantization=quantization)
    assert_agree(want, run(whole_groups_model, tp, params, ps, quantization=quantization), 1e-4)


def test_quantized_shards_shorter_than_a_group_agree_within_wint8s_error():
    # tiny's o_proj rows (64 values) are one group on one rank and one of 32 on each of two: the two quantize
    # the same weights slightly differently (measured: at most 1.6e-3 in log-probability, greedy tokens identical).
    ps = prompts(4, seed=9)
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3)] * len(ps)
    assert_agree(run("tiny", 1, params, ps, quantization="wint8"), run("tiny", 2, params, ps, quantization="wint8"),
                 5e-3)


def test_a_size_the_model_cannot_take_names_what_does_not_divide():
    with pytest.raises(ConfigError, match="does not divide tiny's 4 attention heads"):
        LLM("tiny", tensor_parallel_size=3, **ENGINE)
    with pytest.raises(ConfigError, match="tensor_parallel_size must be"):
        LLM("tiny", tensor_parallel_size=0, **ENGINE)


def test_shards_partition_every_weight():
    c = PRESETS["tiny-qwen3"]
    shards = [Shard(c, r, 2) for r in range(2)]
    assert sum(len(s.heads) for s in shards) == c.num_heads
    assert sum(len(s.intermediate) for s in shards) == c.intermediate_size
    assert shards[1].vocab.stop >= c.vocab_size
    local = shards[0].local_config()
    assert (local.num_heads, local.num_kv_heads, local.head_dim, local.hidden_size) == (2, 1, 32, c.hidden_size)


def test_a_worker_ends_with_its_rank_0_killed_mid_run():
    """kill -9 of rank 0 leaves it no chance to stop its workers: they follow it by themselves (pdlab.lifetime)."""
    code = ("import time; from pdlab import LLM\n"
            f"llm = LLM('tiny', tensor_parallel_size=2, **{ENGINE!r})\n"
            "print(*(p.pid for p in llm.engine.tp.workers), flush=True); time.sleep(600)")
    rank0 = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = int(rank0.stdout.readline())
        rank0.send_signal(signal.SIGKILL)
        rank0.wait(10)
        assert gone_within(worker, POLL_S + GRACE_S + 10.0), "a tensor-parallel worker outlived its rank 0"
    finally:
        rank0.kill()
        rank0.stdout.close()
        if worker is not None and alive(worker):
            os.kill(worker, signal.SIGKILL)
