"""Weight-only quantization of linear weights: wint8 and wint4 (FastDeploy's `--quantization`).

Symmetric and group-wise. A linear weight W [N, K] (out, in) is cut along K
into groups of G values; group g of row n keeps one scale

    s[n, g] = max |W[n, g*G:(g+1)*G]| / qmax,   q = round(W / s) in [-qmax, qmax],

so W ~= q * s with |W - q * s| <= s / 2 for every element (nothing is clipped:
the largest value maps to exactly +-qmax). qmax = 2**(bits-1) - 1, the
symmetric range of TensorRT-LLM's and FastDeploy's weight-only kernels:

- wint8: q in [-127, 127], stored as int8 [N, K];
- wint4: q in [-7, 7], stored offset by 8 (1..15) in 4-bit nibbles, two per byte
  along K, [N, K / 2] uint8. Each group of G values takes G / 2 bytes; byte j
  of group g holds k = g*G + j in its low nibble and k = g*G + G/2 + j in its
  high nibble (the group's two halves, not neighbours 2j and 2j + 1): the
  kernel then multiplies the low nibbles of a tile by one contiguous slice of
  x and the high nibbles by another, where neighbours would need stride-2
  loads of x that can neither be vectorized nor prefetched asynchronously.
  Decoding is `(byte & 15) - 8` and `(byte >> 4) - 8` on an unsigned byte: no
  sign extension, the same code in torch and in Triton. Nibble 0 (-8) is never
  written; it decodes to -8.

Scales are float32 [N, K / G], whatever the weight dtype: a bf16 scale is off
by up to 2**-9 of itself, an error as large as wint8's own rounding, and fp16
scales underflow for small groups; the kernels multiply in fp32 anyway. The
price is 4 bytes per G weights: +3% of wint8's bytes, +6% of wint4's at G = 128.

A row shorter than G (K < G) that is a power of two is one group of K values. A row that
is no multiple of G takes the largest power of two >= 32 that divides K (SmolLM2's rows of
576: groups of 64); a row no such group divides cannot be quantized. The group (the
kernels' K tile) is a power of two >= 32.

Only the transformer's linears are quantized (qkv_proj, o_proj, gate_up_proj,
down_proj); the embedding table, lm_head, norms and biases stay in the model
dtype. `linear` is the one matmul the model calls, for plain and quantized
weights alike.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pdlab.errors import ConfigError

# Rows quantized at a time, so the fp32 temporaries stay near 64 MiB whatever the matrix.
_CHUNK_ELEMENTS = 16 << 20


def _is_tile(n: int) -> bool:
    return n >= 32 and n & (n - 1) == 0


class QuantizationError(ValueError):
    """A weight that a method cannot quantize (its shape, non-finite values); the message names it."""


@dataclass(frozen=True)
class QuantMethod:
    name: str
    bits: int  # 8 or 4
    group_size: int = 128

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"{self.name}: bits must be 4 or 8, got {self.bits}")
        if not _is_tile(self.group_size):
            raise ValueError(f"{self.name}: group_size must be a power of two >= 32, got {self.group_size}")

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def values_per_byte(self) -> int:
        return 8 // self.bits

    def group_size_for(self, k: int, layer: str = "weight") -> int:
        """The group size used for a row of `k` values: `group_size`, or for a row that is no multiple of it
        the largest power of two >= 32 that divides k (SmolLM2's 576: 64); QuantizationError naming `layer`
        when none does."""
        if k < self.group_size and _is_tile(k):
            return k
        g = self.group_size
        while g >= 32 and k % g:
            g //= 2
        if g < 32:
            raise QuantizationError(f"{layer}: in_features {k} is a multiple of no power of two from 32 to "
                                    f"{self.name}'s group size {self.group_size}, so it cannot be cut into groups")
        return g


METHODS: dict[str, QuantMethod] = {"wint8": QuantMethod("wint8", 8), "wint4": QuantMethod("wint4", 4)}


def quant_method(name: str) -> QuantMethod:
    """The method called `name`; ConfigError naming the choices otherwise."""
    if name not in METHODS:
        raise ConfigError(f"unknown quantization {name!r}; choose {', '.join(METHODS)} (or none)")
    return METHODS[name]


class QuantizedWeight(nn.Module):
    """A quantized linear weight [N, K]: `qweight` and `scales` are buffers, so they move with the model.

    It stands where the weight Parameter stood; `linear(x, w)` computes
    x @ dequantize(w).T, and `dequantize()` is the reference for every kernel.
    """

    def __init__(self, method: QuantMethod, qweight: torch.Tensor, scales: torch.Tensor,
                 shape: tuple[int, int], dtype: torch.dtype) -> None:
        super().__init__()
        self.method = method
        self.register_buffer("qweight", qweight)  # wint8: int8 [N, K]; wint4: uint8 [N, K / 2]
        self.register_buffer("scales", scales)  # float32 [N, K / G]
        self.shape = torch.Size(shape)
        self.dtype = dtype  # what dequantize() returns by default: the weight's original dtype

    @property
    def group_size(self) -> int:
        return self.shape[1] // self.scales.shape[1]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() * self.qweight.element_size() + self.scales.numel() * self.scales.element_size()

    def int_values(self) -> torch.Tensor:
        """The integers q [N, K] as int8 (unpacked for wint4)."""
        if self.method.bits == 8:
            return self.qweight
        n, k = self.shape
        g = self.group_size
        packed = self.qweight.to(torch.int16).view(n, k // g, 1, g // 2)
        q = torch.cat(((packed & 15) - 8, (packed >> 4) - 8), dim=2)  # [N, groups, 2, G / 2]: the two halves
        return q.view(n, k).to(torch.int8)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """q * s as a [N, K] tensor of `dtype` (default: the original weight's), computed in fp32."""
        n, k = self.shape
        g = self.group_size
        w = self.int_values().float().view(n, k // g, g) * self.scales[:, :, None]
        return w.view(n, k).to(dtype or self.dtype)

    def extra_repr(self) -> str:
        return f"{self.method.name}, shape={tuple(self.shape)}, group_size={self.group_size}, dtype={self.dtype}"


@torch.no_grad()
def quantize(weight: torch.Tensor, method: QuantMethod, layer: str = "weight") -> QuantizedWeight:
    """Quantize a [N, K] weight; QuantizationError naming `layer` for a bad shape or non-finite values.

    Works on the weight's device, a slab of rows at a time: the temporaries stay
    near 64 MiB of fp32 besides the result. On CUDA they come from a private memory
    pool, freed with it, so that none of them shares a caching-allocator segment
    with a result (a segment with one live block stays reserved, and the KV cache,
    sized after loading, would lack it).
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise QuantizationError(
            f"{layer}: expected a 2-d floating-point weight [out, in], got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    g = method.group_size_for(k, layer)
    qdtype = torch.int8 if method.bits == 8 else torch.uint8
    qweight = torch.empty(n, k // method.values_per_byte, dtype=qdtype, device=weight.device)
    scales = torch.empty(n, k // g, dtype=torch.float32, device=weight.device)
    with _scratch_memory(weight.device):
        _quantize_rows(weight, method, g, qweight, scales, layer)
    return QuantizedWeight(method, qweight, scales, (n, k), weight.dtype)


@contextmanager
def _scratch_memory(device: torch.device):
    """Allocations inside go to a memory pool of their own on CUDA (released when it goes), elsewhere as usual."""
    if device.type != "cuda":
        yield
        return
    with torch.cuda.use_mem_pool(torch.cuda.MemPool(), device):
        yield


def _quantize_rows(weight: torch.Tensor, method: QuantMethod, g: int, qweight: torch.Tensor, scales: torch.Tensor,
                   layer: str) -> None:
    n, k = weight.shape
    rows = max(1, _CHUNK_ELEMENTS // k)
    for r0 in range(0, n, rows):
        w = weight[r0: r0 + rows].float().view(-1, k // g, g)  # [rows, groups, G]
        absmax = w.abs().amax(dim=-1)  # [rows, groups]
        if not torch.isfinite(absmax).all():
            raise QuantizationError(f"{layer}: the weight holds inf or nan, which cannot be quantized")
        scale = absmax / method.qmax
        # An all-zero group keeps scale 0 (it dequantizes to exact zeros); divide by 1 there.
        q = torch.round(w / torch.where(scale > 0, scale, 1.0)[:, :, None]).clamp_(-method.qmax, method.qmax)
        if method.bits == 8:
            qweight[r0: r0 + rows] = q.view(-1, k).to(torch.int8)
        else:
            u = (q + 8).to(torch.uint8).view(-1, k // g, 2, g // 2)  # [rows, groups, halves, G / 2]
            qweight[r0: r0 + rows] = (u[:, :, 0] | (u[:, :, 1] << 4)).view(-1, k // 2)
        scales[r0: r0 + rows] = scale


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias for a plain or a quantized weight. x: [..., K] -> [..., N].

    Quantized, on CUDA: the Triton kernels of pdlab/models/kernels/ (wint_linear.py
    picks one by the number of rows and the card). Elsewhere: dequantize to x's dtype and F.linear, the reference
    (it materializes the [N, K] weight on every call: fine for CPU tests and
    small models, not a fast path).
    """
    if not isinstance(weight, QuantizedWeight):
        return F.linear(x, weight, bias)
    if x.is_cuda:
        from pdlab.models.kernels.wint_linear import wint_linear

        return wint_linear(x, weight, bias)
    return F.linear(x, weight.dequantize(x.dtype), bias)
