"""What an instance tells another instance on its GPU about its weights, so that the other can map
them instead of loading a copy (`pdlab.engine.shared_weights`). Plain structs, no torch: they travel in
control messages (`pdlab.cluster.messages.WeightsOffer`)."""

from __future__ import annotations

import math
from typing import Literal

import msgspec

ITEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "uint8": 1, "int32": 4, "int64": 8}
DType = Literal["float32", "bfloat16", "float16", "int8", "uint8", "int32", "int64"]  # ITEM_BYTES' keys


class TensorRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str  # the tensor's dotted name in the model, e.g. "layers.3.qkv_proj" or "layers.3.o_proj.qweight"
    dtype: DType
    shape: list[int]
    allocation: int  # index into SharedWeights.handles
    offset_bytes: int  # from the allocation's start


class QuantizedRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str  # the QuantizedWeight's dotted name, e.g. "layers.3.o_proj"
    method: str  # "wint8" or "wint4"
    shape: list[int]  # the unquantized weight's [N, K]
    dtype: DType  # what it dequantizes to


class SharedWeights(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything a process on the same GPU needs to map a model's weights (no weight bytes)."""

    model: str  # where the weights came from (a preset's name, a directory, a file)
    dtype: str
    quantization: str | None
    device_uuid: str
    handles: list[bytes]  # one CUDA IPC handle per allocation
    allocation_bytes: list[int]
    tensors: list[TensorRef]
    quantized: list[QuantizedRef] = []

    @property
    def num_bytes(self) -> int:
        """The weights' own bytes (what a second copy would cost)."""
        return sum(ITEM_BYTES[t.dtype] * math.prod(t.shape) for t in self.tensors)
