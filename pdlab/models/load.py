"""Build a `Transformer` on a device from a resolved model source."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pdlab.errors import ConfigError
from pdlab.models.quant import QuantizationError, quant_method
from pdlab.models.source import ModelSource
from pdlab.models.transformer import Transformer

if TYPE_CHECKING:
    from pdlab.models.parallel import TensorParallel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """auto (a GPU if there is one), cpu, cuda or cuda:N; ConfigError for a GPU this machine does not have."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device}: this machine has no CUDA GPU that torch {torch.__version__} can use; "
                              "use device cpu or auto")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    source: ModelSource, dtype: torch.dtype, device: torch.device, seed: int = 0, quantization: str | None = None,
    tp: TensorParallel | None = None,
) -> Transformer:
    """Weights from the source's files, or random ones (seeded) for a preset; optionally quantized.

    `quantization` ("wint8", "wint4"; pdlab/models/quant.py) quantizes the
    layers' linears. Peak memory while loading:
    - a preset is built on the meta device and each layer is drawn and
      quantized before the next is allocated: the quantized model plus one
      layer in `dtype` (e.g. 0.44 GB for llama3-8b in bf16);
    - a checkpoint is loaded whole in `dtype`, then quantized layer by layer
      (its tensors come in file order, not layer order): the unquantized model
      plus one layer's quantized copy and ~64 MiB of temporaries.
    On CUDA the freed memory is then returned to the driver, so that the
    engine, which sizes the KV cache from `torch.cuda.mem_get_info` after
    loading, counts only what the quantized model holds (plus whatever the
    caching allocator cannot release: a conservative error).

    With `tp`, this rank's shard (pdlab/models/sharding.py) of the same weights.

    Raises ConfigError for an unknown method or a layer whose shape it cannot
    take (naming the layer), or a tensor-parallel size the shape does not divide.
    """
    method = None if quantization is None else quant_method(quantization)
    try:
        if source.kind == "preset" and method is not None:
            model = Transformer(source.config, dtype=dtype, device="meta", tp=tp)
            model.init_random(seed, quantization=method, device=device)
        else:
            model = Transformer(source.config, dtype=dtype, device=device, tp=tp)
            if source.kind == "preset":
                model.init_random(seed)
            else:
                model.load_weights(source.iter_weights())
            if method is not None:
                model.quantize_(method)
    except QuantizationError as e:
        raise ConfigError(f"quantization {quantization!r} does not fit {source.config.name}: {e}") from None
    if method is not None and device.type == "cuda":
        torch.cuda.empty_cache()
    return model.eval()
