"""One copy of the weights for two instances on one GPU, through CUDA IPC.

A prefill and a decode instance sharing a GPU would each hold the whole model (16 GB
for llama3-8b in bf16) and leave the KV cache what remains. Instead the prefill instance
exports its weights: the IPC handle of each allocation of PyTorch's allocator that holds
any, and for every tensor its allocation, byte offset, dtype and shape
(`export_weights`). The decode instance maps those allocations with the same driver
calls the KV transport uses and builds its model around them (`map_weights`), so its
own weight memory is near zero and its KV cache takes the rest of its share.

The mapped memory is the exporter's: the decode instance relies on the prefill instance
staying up (a deployment stops its decode instances first), and neither writes weights
after loading. Only for instances on the same GPU (checked by the card's UUID) and
without tensor parallelism.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pdlab.transfer.cuda_handles import CudaIpcError, allocation_of, device_uuid, export_allocation, open_handle
from pdlab.engine.weight_refs import QuantizedRef, SharedWeights, TensorRef
from pdlab.errors import ConfigError
from pdlab.models.config import ModelConfig
from pdlab.models.quant import QuantizedWeight, quant_method
from pdlab.models.transformer import Transformer


def export_weights(model: Transformer, location: str, quantization: str | None) -> SharedWeights:
    """Describe `model`'s tensors (on one CUDA device) for `map_weights` in another process."""
    device = model.device
    if device.type != "cuda":
        raise ConfigError("only weights on a GPU can be shared (CUDA IPC)")
    torch.cuda.set_device(device)
    bases: dict[int, int] = {}  # allocation base -> index
    handles, sizes, tensors = [], [], []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not tensor.is_contiguous():
            raise ConfigError(f"cannot share the non-contiguous weight {name}")
        base, size = allocation_of(tensor.data_ptr())
        if base not in bases:
            bases[base] = len(handles)
            handles.append(export_allocation(base))
            sizes.append(size)
        tensors.append(TensorRef(name, _dtype_name(tensor.dtype), list(tensor.shape), bases[base],
                                 tensor.data_ptr() - base))
    quantized = [QuantizedRef(name, module.method.name, list(module.shape), _dtype_name(module.dtype))
                 for name, module in model.named_modules() if isinstance(module, QuantizedWeight)]
    return SharedWeights(location, _dtype_name(model.dtype), quantization, device_uuid(device), handles, sizes,
                         tensors, quantized)


def map_weights(shared: SharedWeights, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                location: str, quantization: str | None) -> Transformer:
    """A `Transformer` whose every tensor is `shared`'s memory, mapped into this process.

    Raises ConfigError when `shared` describes another model, dtype, quantization or GPU,
    or when the driver refuses to map it."""
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    wanted = {"model": location, "dtype": _dtype_name(dtype), "quantization": quantization,
              "device_uuid": device_uuid(device)}
    for key, value in wanted.items():
        if getattr(shared, key) != value:
            what = "GPU" if key == "device_uuid" else key
            raise ConfigError(f"cannot share weights: the other instance has {what} {getattr(shared, key)!r}, "
                              f"this one {value!r} (weights are shared only between instances of one model on one GPU)")
    try:
        bases = [open_handle(h, device) for h in shared.handles]
    except CudaIpcError as e:
        raise ConfigError(f"cannot map the other instance's weights: {e}") from None
    allocations = [_bytes_at(base, size, device) for base, size in zip(bases, shared.allocation_bytes)]
    model = Transformer(config, dtype=dtype, device="meta")
    for q in shared.quantized:  # the quantized linears' modules first, so their buffers have a home
        parent, attr = _parent(model, q.name)
        placeholder = torch.empty(0, device="meta")
        delattr(parent, attr)
        setattr(parent, attr, QuantizedWeight(quant_method(q.method), placeholder, placeholder, tuple(q.shape),
                                              _dtype(q.dtype)))
    for ref in shared.tensors:
        nbytes = _dtype(ref.dtype).itemsize * math.prod(ref.shape)
        if not 0 <= ref.allocation < len(allocations) or not 0 <= ref.offset_bytes <= len(allocations[ref.allocation]) - nbytes:
            raise ConfigError(f"cannot share weights: {ref.name} lies outside the memory the other instance exported")
        raw = allocations[ref.allocation][ref.offset_bytes:ref.offset_bytes + nbytes]
        tensor = raw.view(_dtype(ref.dtype)).view(ref.shape)
        parent, attr = _parent(model, ref.name)
        if attr in parent._parameters:
            parent._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        elif attr in parent._buffers:
            parent._buffers[attr] = tensor
        else:
            raise ConfigError(f"cannot share weights: this model has no tensor {ref.name}")
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ConfigError(f"cannot share weights: the other instance's model lacks {', '.join(left[:3])}")
    return model.eval()


class _CudaBytes:
    """`size` bytes at a device address, as `torch.as_tensor` takes them (the CUDA array interface)."""

    def __init__(self, address: int, size: int) -> None:
        self.__cuda_array_interface__ = {"shape": (size,), "typestr": "|u1", "data": (address, False), "version": 3}


def _bytes_at(address: int, size: int, device: torch.device) -> torch.Tensor:
    with torch.cuda.device(device):
        return torch.as_tensor(_CudaBytes(address, size), device=device)  # uint8 [size], no copy


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    try:
        return (model.get_submodule(path) if path else model), attr
    except AttributeError:
        raise ConfigError(f"cannot share weights: this model has no module {path}") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"cannot share weights: unknown dtype {name!r}")
    return dtype
