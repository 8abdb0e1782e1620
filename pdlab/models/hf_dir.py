"""Read a local Hugging Face model directory: `config.json` and `*.safetensors`.

Only the dense decoder families that `ModelConfig` describes are accepted
(`SUPPORTED_MODEL_TYPES`); anything else is refused with a `ConfigError` that
names them. Weights come out one tensor at a time under their Hugging Face
names, so a model never sits in memory twice. Nothing here downloads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from pdlab.errors import ConfigError, ModelNotFoundError
from pdlab.models.config import ModelConfig, RopeScaling

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SAFETENSORS_INDEX = "model.safetensors.index.json"


def read_hf_config(model_dir: str | Path) -> ModelConfig:
    """The `ModelConfig` of `model_dir/config.json` (reads no weights)."""
    model_dir = Path(model_dir)
    return config_from_hf_dict(_read_json(model_dir / "config.json"), name=model_dir.resolve().name)


def config_from_hf_dict(raw: dict[str, Any], name: str) -> ModelConfig:
    """Map a parsed Hugging Face `config.json` onto `ModelConfig`.

    Accepts both transformers 4 (`rope_theta`, `rope_scaling`) and
    transformers 5 (`rope_parameters` holding `rope_theta`) spellings. Raises
    `ConfigError` for a model type or feature that `ModelConfig` cannot express
    (other rope scalings, o_proj/MLP biases).
    """
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{name}: model_type {model_type!r} is not supported; pdlab runs {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        hidden_size = int(raw["hidden_size"])
        num_heads = int(raw["num_attention_heads"])
        return ModelConfig(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=raw.get("head_dim") or None,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(raw),
            rope_scaling=_rope_scaling(raw, name),
            max_position_embeddings=_max_positions(raw),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qk_norm=model_type == "qwen3",
            attention_bias=_attention_bias(raw, name),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=_first(raw.get("eos_token_id")),
            name=name,
        )
    except KeyError as missing:
        raise ConfigError(f"{name}: config.json lacks the key {missing}") from None


def read_eos_token_ids(model_dir: str | Path) -> tuple[int, ...]:
    """Every end-of-sequence id, in order, from config.json then generation_config.json.

    Instruct models often stop on several ids (Llama 3.1: end_of_text,
    eom_id, eot_id), while `ModelConfig.eos_token_id` keeps only the first.
    """
    model_dir = Path(model_dir)
    ids: list[int] = []
    for file_name in ("config.json", "generation_config.json"):
        path = model_dir / file_name
        if path.is_file():
            ids += [i for i in _as_list(_read_json(path).get("eos_token_id")) if i not in ids]
    return tuple(ids)


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The weight files of `model_dir`: those its index names, else every `*.safetensors`."""
    model_dir = Path(model_dir)
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        names = dict.fromkeys(_read_json(index)["weight_map"].values())  # ordered, deduplicated
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{model_dir} holds no *.safetensors weight files")
    for path in files:
        if not path.is_file():
            raise ModelNotFoundError(f"{index} names {path.name}, which is missing")
    return files


def iter_safetensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, tensor)` one at a time, in the files' dtype, on CPU.

    Each tensor is read from its memory-mapped file only when the consumer
    asks for it; the caller owns it and may keep or drop it.
    """
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _rope_theta(raw: dict[str, Any]) -> float:
    params = raw.get("rope_parameters") or {}
    return float(raw.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(raw: dict[str, Any], name: str) -> RopeScaling | None:
    params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ConfigError(f"{name}: rope type {rope_type!r} is not supported; pdlab runs 'default' and 'llama3'")
    return RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def _max_positions(raw: dict[str, Any]) -> int:
    max_positions = int(raw.get("max_position_embeddings", 4096))
    # pdlab has no sliding-window attention; a sequence that fits the window
    # attends identically either way, so cap the length at the window.
    window = raw.get("sliding_window")
    window_on = raw.get("use_sliding_window", raw.get("model_type") == "mistral")
    if window and window_on:
        max_positions = min(max_positions, int(window))
    return max_positions


def _attention_bias(raw: dict[str, Any], name: str) -> bool:
    if raw["model_type"] == "qwen2":
        return True  # transformers' Qwen2 always has q/k/v biases, whatever the config says
    # In Llama and Qwen3 `attention_bias` also puts a bias on o_proj, which ModelConfig lacks.
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise ConfigError(f"{name}: o_proj and MLP biases (attention_bias/mlp_bias) are not supported")
    return False


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _first(value: int | list[int] | None) -> int | None:
    ids = _as_list(value)
    return ids[0] if ids else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
