"""A Hugging Face directory written by transformers reads back as the same config and the same tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from pdlab.errors import ConfigError, ModelNotFoundError
from pdlab.models import hf_dir
from pdlab.models.config import ModelConfig, RopeScaling
from pdlab.models.hf_dir import config_from_hf_dict, iter_safetensors, read_eos_token_ids, safetensors_files
from pdlab.models.source import resolve_model

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
EXPECTED = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

# name: (transformers config class, its kwargs, the ModelConfig fields we expect beyond EXPECTED)
CASES = {
    "llama3": (transformers.LlamaConfig,
               dict(COMMON, num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
               dict(num_kv_heads=2, rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64))),
    "qwen2": (transformers.Qwen2Config, dict(COMMON, num_key_value_heads=1, tie_word_embeddings=True),
              dict(num_kv_heads=1, attention_bias=True, tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(COMMON, num_key_value_heads=2, head_dim=32, rope_theta=1e6),
              dict(num_kv_heads=2, head_dim=32, qk_norm=True, rope_theta=1e6)),
    "mistral": (transformers.MistralConfig, dict(COMMON, num_key_value_heads=2, sliding_window=None),
                dict(num_kv_heads=2)),
}


def save_random_model(folder: Path, config_class, kwargs: dict, shard: bool = False) -> dict[str, torch.Tensor]:
    """Save a seeded random model to `folder`; return the tensors the folder should hold."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**kwargs), dtype=torch.float32)
    model.save_pretrained(folder, max_shard_size="100KB" if shard else "5GB")
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # tied: transformers does not save it
    return state


@pytest.mark.parametrize("case", CASES)
def test_directory_round_trip(tmp_path: Path, case: str) -> None:
    config_class, kwargs, expected = CASES[case]
    folder = tmp_path / f"tiny-{case}"
    state = save_random_model(folder, config_class, kwargs)

    source = resolve_model(folder)

    assert source.kind == "hf_dir" and source.path == folder.resolve()
    assert source.config == ModelConfig(**EXPECTED, **expected, name=folder.name)
    loaded = list(source.iter_weights())
    assert sorted(name for name, _ in loaded) == sorted(state)
    for name, tensor in loaded:
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0, msg=name)


def test_sharded_directory_reads_every_shard_once(tmp_path: Path) -> None:
    config_class, kwargs, _ = CASES["llama3"]
    state = save_random_model(tmp_path, config_class, kwargs, shard=True)

    assert (tmp_path / "model.safetensors.index.json").is_file() and len(safetensors_files(tmp_path)) > 1
    names = [name for name, _ in iter_safetensors(tmp_path)]
    assert sorted(names) == sorted(state)


def test_weights_are_yielded_lazily(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_class, kwargs, _ = CASES["llama3"]
    state = save_random_model(tmp_path, config_class, kwargs, shard=True)
    opened, read = [], []

    class CountingSafeOpen:
        """safetensors' safe_open, counting the shards opened and the tensors read."""

        def __init__(self, path, **kw):
            opened.append(Path(path).name)
            self.file = safe_open(path, **kw)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.file.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.file.get_tensor(name)

    monkeypatch.setattr(hf_dir, "safe_open", CountingSafeOpen)
    weights = iter_safetensors(tmp_path)
    assert (opened, read) == ([], []), "nothing is read before the first next()"
    name, tensor = next(weights)
    assert len(safetensors_files(tmp_path)) > 1 and len(opened) == 1 and read == [name], (opened, read)
    torch.testing.assert_close(tensor, state[name], rtol=0, atol=0)
    rest = [n for n, _ in weights]
    assert sorted([name, *rest]) == sorted(read) == sorted(state), "each tensor read once, when asked for"


def test_directory_tokenizer_round_trip(tmp_path: Path, smollm2_tokenizer) -> None:
    config_class, kwargs, _ = CASES["llama3"]
    save_random_model(tmp_path, config_class, kwargs)
    smollm2_tokenizer.hf.save_pretrained(tmp_path)

    tokenizer = resolve_model(tmp_path).load_tokenizer()

    text = "Prefill, then decode: naïve ✓"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode(text) == smollm2_tokenizer.encode(text)
    assert tokenizer.eos_token_id == 2 and tokenizer.eos_token_ids == (2,)
    chat = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(chat) == smollm2_tokenizer.apply_chat_template(chat)


def transformers4_llama31() -> dict:
    """Llama-3.1-8B-Instruct's config.json as transformers 4 wrote it."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "head_dim": 128,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16",
    }


def test_transformers4_config_with_eos_list() -> None:
    from pdlab.models.presets import PRESETS

    config = config_from_hf_dict(transformers4_llama31(), name="llama3-8b")

    assert config == PRESETS["llama3-8b"]  # eos: the first of the list


def test_all_eos_ids_from_config_and_generation_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(transformers4_llama31()))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128009, 128001, 7]}))

    assert read_eos_token_ids(tmp_path) == (128001, 128008, 128009, 7)


def test_sliding_window_caps_the_context() -> None:
    raw = dict(transformers4_llama31(), model_type="mistral", rope_scaling=None, sliding_window=4096,
               max_position_embeddings=32768)
    assert config_from_hf_dict(raw, "mistral-v0.1").max_position_embeddings == 4096
    qwen = dict(raw, model_type="qwen2", use_sliding_window=False, sliding_window=4096)
    assert config_from_hf_dict(qwen, "qwen2").max_position_embeddings == 32768


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "deepseek_v3"}, "llama, mistral, qwen2, qwen3"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
        ({"attention_bias": True}, "o_proj"),
        ({"hidden_size": None}, "hidden_size"),
    ],
)
def test_unsupported_configs_are_named(change: dict, message: str) -> None:
    raw = transformers4_llama31() | change
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        config_from_hf_dict(raw, "bad")


def test_directory_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(transformers4_llama31()))
    source = resolve_model(tmp_path)  # config alone resolves: weights are not read yet
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        next(source.iter_weights())
