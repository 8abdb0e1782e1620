"""Our transformer on the paged KV cache against transformers' implementation of the same weights."""

from __future__ import annotations

import pytest
import torch
import transformers

from pdlab.models.kv_cache import KVCache
from pdlab.engine.model_runner import ModelRunner
from pdlab.models.config import ModelConfig, RopeScaling
from pdlab.models.transformer import Transformer
from pdlab.policy.block_manager import BlockManager
from pdlab.policy.request import Request
from pdlab.policy.scheduler import Scheduler, SchedulerConfig
from pdlab.sampling_params import SamplingParams

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, rms_norm_eps=1e-6)

CASES = {
    # GQA, untied, llama3 rope scaling
    "llama3-gqa": (transformers.LlamaConfig, dict(COMMON, num_key_value_heads=2, tie_word_embeddings=False,
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    # tied embeddings, multi-head (no GQA)
    "llama-tied-mha": (transformers.LlamaConfig, dict(COMMON, num_key_value_heads=4, tie_word_embeddings=True)),
    # Qwen3: q/k norm, explicit head_dim different from hidden/heads
    "qwen3-qknorm": (transformers.Qwen3Config, dict(COMMON, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)),
    # Qwen2: bias on q, k, v
    "qwen2-bias": (transformers.Qwen2Config, dict(COMMON, num_key_value_heads=1, tie_word_embeddings=False)),
}


def ours_config(hf_config, name: str) -> ModelConfig:
    rs = getattr(hf_config, "rope_parameters", None) or {}
    scaling = None
    if rs.get("rope_type") == "llama3":
        scaling = RopeScaling(rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"])
    return ModelConfig(
        vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size, intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers, num_heads=hf_config.num_attention_heads,
        num_kv_heads=hf_config.num_key_value_heads, head_dim=getattr(hf_config, "head_dim", None),
        rms_norm_eps=hf_config.rms_norm_eps, rope_theta=rs.get("rope_theta", 10000.0), rope_scaling=scaling,
        max_position_embeddings=hf_config.max_position_embeddings, tie_word_embeddings=hf_config.tie_word_embeddings,
        qk_norm=name.startswith("qwen3"), attention_bias=name.startswith("qwen2"), name=name,
    )


def build(name: str):
    cls, kwargs = CASES[name]
    torch.manual_seed(0)
    hf_config = cls(**kwargs)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():  # biases start at zero in HF's init; make them matter
        for n, p in hf.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model = Transformer(ours_config(hf.config, name))
    model.load_weights(hf.state_dict().items())
    return hf, model


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("chunked", [False, True])
def test_prefill_and_decode_logits_match_transformers(name, chunked):
    hf, model = build(name)
    block_size = 8
    cache = KVCache(model.config, num_blocks=64, block_size=block_size, dtype=torch.float32, device="cpu")
    runner = ModelRunner(model, cache)
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=24 if chunked else 256,
                                          enable_chunked_prefill=chunked, max_model_len=256),
                          BlockManager(64, block_size))
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (5, 17, 1, 30)]
    for i, p in enumerate(prompts):
        scheduler.add(Request(str(i), p, SamplingParams(max_tokens=6, temperature=0)))

    steps = 0
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        ids, pos, ctx, _ = runner.prepare(batch)
        with torch.no_grad():
            logits = model.compute_logits(model(ids, pos, ctx))  # [T, vocab], every position
        sampled = {}
        for s, item in zip(ctx.seqs, batch.items):
            request = item.request
            context = request.all_token_ids[: item.start + item.num_tokens]
            with torch.no_grad():
                ref = hf(torch.tensor([context])).logits[0, item.start:]  # [num_tokens, vocab]
            ours = logits[s.q_start: s.q_start + s.q_len]
            torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4, msg=f"{name} request {request.request_id}")
            if item.sample:
                sampled[request.request_id] = int(ours[-1].argmax())
        scheduler.update(batch, sampled, now_s=float(steps))
        steps += 1
    assert steps >= 6
