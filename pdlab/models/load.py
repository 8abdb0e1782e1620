"""Build a `Transformer` on a device from a resolved model source."""

from __future__ import annotations

import torch

from pdlab.models.source import ModelSource
from pdlab.models.transformer import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        from pdlab.errors import ConfigError

        raise ConfigError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(source: ModelSource, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Transformer:
    """Weights from the source's files, or random ones (seeded) for a preset."""
    model = Transformer(source.config, dtype=dtype, device=device)
    if source.kind == "preset":
        model.init_random(seed)
    else:
        model.load_weights(source.iter_weights())
    return model.eval()
