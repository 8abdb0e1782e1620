"""The small per-layer operations of a decoder layer, each one kernel (the triton backend's path).

In a CUDA-graph decode step of llama3-8b at batch 1 the linears and attention
took ~4.2 ms of the 6.7 ms graph (H200, benchmarks/decode_breakdown.py): the
rest was ~40 tiny PyTorch kernels per layer (RMSNorm as 7, RoPE as 9 per
tensor, the KV cache writes, SiLU and the product), each a few microseconds
of launch and almost no work. Here each is one launch:

- `rms_norm(x, w, eps, residual=None)`: RMSNorm of every row; with `residual`,
  of x + residual, returning the sum too (the residual stream);
- `rope_and_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots)`: rotates q
  (returned) and k, and writes k and v at their cache slots;
- `silu_and_mul(gate_up)`: silu(gate) * up of the merged projection.

Each rounds where the PyTorch reference (pdlab/models/transformer.py) rounds:
fp32 arithmetic, cast to the model dtype at the same points, so outputs
match it to the last bit except where the compiler fuses a multiply-add.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, H, stride_x, stride_r, stride_o, stride_s, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # the sum is rounded to the model dtype first, as `x + delta` is
        x = (x.to(tl.float32) + tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32))
        x = x.to(out_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_s + offs, x, mask=mask)
    x = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
    y = (x * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] (rows contiguous) -> RMSNorm(x) * weight; with `residual`, (RMSNorm(x + residual) * weight,
    x + residual)."""
    T, H = x.shape
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)
    total = torch.empty_like(out) if residual is not None else out
    if T:
        r = residual if residual is not None else x
        _rms_norm_kernel[(T,)](x, r, weight, out, total, H, x.stride(0), r.stride(0), out.stride(0), total.stride(0),
                               eps, HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(H),
                               num_warps=4 if H <= 4096 else 8)
    return out if residual is None else (out, total)


@triton.jit
def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr, slot_ptr,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct,
                    stride_qot, stride_qoh, stride_cs, stride_ch,
                    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    # Program (t, h): query head h < NUM_HEADS, else KV head h - NUM_HEADS (k rotated, v copied).
    t = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.arange(0, HALF_PAD)
    mask = offs < HALF
    cos = tl.load(cos_ptr + t * stride_ct + offs, mask=mask, other=0.0)
    sin = tl.load(sin_ptr + t * stride_ct + offs, mask=mask, other=0.0)
    if h < NUM_HEADS:
        src = q_ptr + t * stride_qt + h * stride_qh
        dst = qo_ptr + t * stride_qot + h * stride_qoh
    else:
        kh = h - NUM_HEADS
        slot = tl.load(slot_ptr + t)
        src = k_ptr + t * stride_kt + kh * stride_kh
        dst = kc_ptr + slot * stride_cs + kh * stride_ch
        v = tl.load(v_ptr + t * stride_vt + kh * stride_vh + tl.arange(0, 2 * HALF_PAD),
                    mask=tl.arange(0, 2 * HALF_PAD) < 2 * HALF)
        tl.store(vc_ptr + slot * stride_cs + kh * stride_ch + tl.arange(0, 2 * HALF_PAD), v,
                 mask=tl.arange(0, 2 * HALF_PAD) < 2 * HALF)
    x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    odt = dst.dtype.element_ty
    tl.store(dst + offs, (x1 * cos - x2 * sin).to(odt), mask=mask)
    tl.store(dst + HALF + offs, (x2 * cos + x1 * sin).to(odt), mask=mask)


def rope_and_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """q [T, H, D], k and v [T, H_kv, D] (any row strides, heads contiguous inside); cos, sin [T, D / 2]
    fp32; k_cache, v_cache [num_blocks, block_size, H_kv, D]; slots [T] int64. Writes rotated k and v at
    their slots; returns rotated q [T, H, D] (contiguous)."""
    T, H, D = q.shape
    H_kv = k.shape[1]
    q_out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    if T:
        kc = k_cache.view(-1, H_kv, D)
        vc = v_cache.view(-1, H_kv, D)
        assert kc.stride() == vc.stride() and q.stride(2) == k.stride(2) == v.stride(2) == 1
        _rope_kv_kernel[(T, H + H_kv)](
            q, k, v, cos, sin, q_out, kc, vc, slots,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
            q_out.stride(0), q_out.stride(1), kc.stride(0), kc.stride(1),
            NUM_HEADS=H, HALF=D // 2, HALF_PAD=triton.next_power_of_2(D // 2), num_warps=1)
    return q_out


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, I, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + I + offs, mask=mask, other=0.0).to(tl.float32)
    odt = out_ptr.dtype.element_ty
    act = (gate / (1.0 + tl.exp(-gate))).to(odt).to(tl.float32)  # F.silu rounds to the dtype first
    tl.store(out_ptr + row * stride_o + offs, (act * up).to(odt), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 I] -> silu(gate_up[:, :I]) * gate_up[:, I:], [T, I]."""
    T, two_i = gate_up.shape
    inner = two_i // 2
    out = torch.empty(T, inner, dtype=gate_up.dtype, device=gate_up.device)
    if T:
        block = 1024
        _silu_mul_kernel[(T, triton.cdiv(inner, block))](gate_up, out, inner, gate_up.stride(0), out.stride(0),
                                                         BLOCK=block, num_warps=4)
    return out
