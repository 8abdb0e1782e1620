"""Presets have the published shapes: their parameter counts are the models' published sizes."""

from __future__ import annotations

import pytest

from pdlab.models.presets import PRESETS

# total parameters of the real checkpoints (safetensors metadata on the Hub)
PUBLISHED_PARAMS = {
    "smollm2-135m": 134_515_008,
    "llama2-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "qwen3-8b": 8_190_735_360,  # includes q/k norm weights, which num_params leaves out
    "qwen2.5-7b": 7_615_616_512,  # includes q/k/v biases, which num_params leaves out
    "mistral-7b": 7_248_023_552,
}


@pytest.mark.parametrize("name", PUBLISHED_PARAMS)
def test_real_shapes_have_the_published_size(name: str) -> None:
    assert PRESETS[name].num_params() == pytest.approx(PUBLISHED_PARAMS[name], rel=2e-4)


def test_names_and_tiny_presets() -> None:
    assert all(config.name == name for name, config in PRESETS.items())
    tiny = {name: config for name, config in PRESETS.items() if name.startswith("tiny")}
    assert all(config.num_params() < 200_000 for config in tiny.values())
    # together the tiny presets cover every branch of the model
    assert any(c.qk_norm for c in tiny.values()) and any(c.attention_bias for c in tiny.values())
    assert any(c.rope_scaling for c in tiny.values()) and any(c.tie_word_embeddings for c in tiny.values())
    assert any(c.head_dim != c.hidden_size // c.num_heads for c in tiny.values())


def test_llama31_8b_shape() -> None:
    c = PRESETS["llama3-8b"]
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (128256, 4096, 14336, 32)
    assert (c.num_heads, c.num_kv_heads, c.rope_theta, c.max_position_embeddings) == (32, 8, 500000.0, 131072)
    assert c.rope_scaling.factor == 8.0 and c.rope_scaling.original_max_position_embeddings == 8192
    assert c.kv_bytes_per_token(dtype_bytes=2) == 128 * 1024  # 128 KiB per token in bf16
