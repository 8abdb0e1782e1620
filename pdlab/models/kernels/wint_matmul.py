"""The Triton kernels of x @ dequant(W)^T for wint8/wint4 weights (pdlab/models/quant.py).

Three ways to compute a quantized linear; `pdlab/models/kernels/wint_linear.py` picks one by M (x's rows):

- `wint_gemv` (one row: a decode step of one request): no loop and no MMA. Each program loads one chunk of
  whole groups of the packed weight in one wide load, converts it to fp32 and multiplies each row of x by
  it, summing per group before the group's scale. Thousands of programs keep the card's loads in flight
  (on an H100, wint4 at M = 1: 1.7-2.2x bf16's cuBLAS, against 1.05-1.2x for the looping kernel); each
  further row costs as much as the first, so from two rows the MMA kernel wins. The chunks of one row of W
  are split-K parts (below).
- `wint_matmul` (a few to a few hundred rows): loops over K tiles with tl.dot, as out^T = W x^T: the
  converted weight tile is the MMA's left operand, straight from registers in its natural [N, K] layout,
  x's rows the narrow right one (with W on the right, the tile went through shared memory and the kernel
  ran at 15-40% of the copy bandwidth on an H200). Each K tile lies inside one group, so the group's
  scale multiplies the tile's partial product. A wint4 tile's low and high nibbles hold the two halves of
  a group (quant.py's layout), so each multiplies one contiguous slice of x. A wint4 nibble becomes a
  16-bit float by its bits alone (MAGIC below) and the bias that adds is taken off once per row of x.
- `dequantize_weight` + cuBLAS (prefill): the weight dequantized into a scratch [N, K] tensor of x's dtype
  (2.5-3 bytes of traffic per weight), then F.linear.

Split-K partial sums go to an fp32 workspace [split, M, N] that a second small kernel sums in a fixed
order, adding the bias and casting: deterministic (atomics are not), and one extra launch where atomics
would need two (a memset and the cast).

fp32 activations take the dequantize + F.linear path on a GPU: tl.dot on fp32 would round through tf32.
In Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) the kernels run on fp16 and fp32; bf16 is wrong.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pdlab.models.quant import QuantizedWeight

TARGET_WAVES = 2  # programs in flight per SM that small-M launches aim for
MIN_TILES_PER_SPLIT = 4  # fewer K tiles per program and the pipeline never fills
INTERPRETER_NUM_SMS = 132  # an H100's, so that the interpreter exercises the same split-K choices


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int  # divides the group size: a K tile never straddles two scales
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def _wint_matmul_kernel(
    x_ptr, qw_ptr, scale_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_qn, stride_sn, stride_om, stride_os, tiles_per_split,
    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, MAGIC: tl.constexpr = 0, MAGIC_OFFSET: tl.constexpr = 0.0,
):
    # Program (m, n, s) computes out[m tile, n tile] over K tiles [s * tiles_per_split, ...), as the
    # transposed product W[n tile] @ x[m tile]^T: the weight is the MMA's left operand, straight from
    # registers after the integer-to-float conversion in its natural [N, K] layout (no trip through shared
    # memory), and the few rows of x are the narrow right operand.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, K // BLOCK_K)
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # out^T's tile
    if BITS == 8:
        offs_k = tl.arange(0, BLOCK_K)
        q_ptrs = qw_ptr + offs_n[:, None] * stride_qn + offs_k[None, :]  # [BN, BK]
        x_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None]  # [BK, BM]: x^T's tile
        for t in range(t0, t1):
            k0 = t * BLOCK_K
            q = tl.load(q_ptrs + k0, mask=mask_n[:, None], other=0)
            x = tl.load(x_ptrs + k0, mask=mask_m[None, :], other=0.0)
            s = tl.load(scale_ptr + offs_n * stride_sn + k0 // GROUP, mask=mask_n, other=0.0)  # [BN] fp32
            acc += tl.dot(q.to(dt), x) * s[:, None]
    else:
        # A tile is BLOCK_K / 2 bytes of a group: their low nibbles are k = k_lo + j and their
        # high nibbles k = k_lo + GROUP / 2 + j (quant.py's layout), two contiguous slices of x.
        offs_j = tl.arange(0, BLOCK_K // 2)
        q_ptrs = qw_ptr + offs_n[:, None] * stride_qn + offs_j[None, :]  # [BN, BK / 2]
        x_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_j[:, None]  # [BK / 2, BM]
        for t in range(t0, t1):
            j0 = t * (BLOCK_K // 2)  # first byte of the tile in its row
            k_lo = j0 + (j0 // (GROUP // 2)) * (GROUP // 2)  # = group * GROUP + the tile's offset in its group
            b = tl.load(q_ptrs + j0, mask=mask_n[:, None], other=0).to(tl.int32)
            x_lo = tl.load(x_ptrs + k_lo, mask=mask_m[None, :], other=0.0)
            x_hi = tl.load(x_ptrs + k_lo + GROUP // 2, mask=mask_m[None, :], other=0.0)
            s = tl.load(scale_ptr + offs_n * stride_sn + k_lo // GROUP, mask=mask_n, other=0.0)
            if MAGIC != 0:
                # A nibble u in the low mantissa bits of MAGIC (a 16-bit float, 128.0 in bf16 or 1024.0 in
                # fp16) is the float MAGIC + u exactly, with no conversion instruction; the bias that adds to
                # each product, (MAGIC + 8) * x, is taken off once per row: (MAGIC + 8) * sum(x over the tile).
                lo = ((b & 15) | MAGIC).to(tl.int16).to(dt, bitcast=True)
                hi = ((b >> 4) | MAGIC).to(tl.int16).to(dt, bitcast=True)
                x_sum = tl.sum(x_lo.to(tl.float32), axis=0) + tl.sum(x_hi.to(tl.float32), axis=0)  # [BM]
                acc += (tl.dot(lo, x_lo) + tl.dot(hi, x_hi) - MAGIC_OFFSET * x_sum[None, :]) * s[:, None]
            else:
                lo = ((b & 15) - 8).to(dt)
                hi = ((b >> 4) - 8).to(dt)
                acc += (tl.dot(lo, x_lo) + tl.dot(hi, x_hi)) * s[:, None]
    out_mask = mask_n[:, None] & mask_m[None, :]
    if SPLIT:
        ptrs = out_ptr + pid_s * stride_os + offs_m[None, :] * stride_om + offs_n[:, None]
        tl.store(ptrs, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        ptrs = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _wint_gemv_kernel(
    x_ptr, qw_ptr, scale_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_qn, stride_sn, stride_om, stride_os,
    BITS: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
):
    # Program (n, s) computes out[:M, n tile] over the K chunk s (BLOCK_K values, whole groups) with no loop
    # and no MMA: the chunk's packed bytes are loaded once, in one wide load, converted to fp32 and
    # multiplied by each of x's ROWS rows in turn (multiply-adds and a sum per group, times its scale).
    # With thousands of such programs the card keeps enough loads in flight to run near its bandwidth,
    # which a looping kernel with one MMA tile per step does not at one row.
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k0 = pid_s * BLOCK_K
    R: tl.constexpr = BLOCK_K // GROUP  # groups in the chunk
    offs_g = k0 // GROUP + tl.arange(0, R)
    s = tl.load(scale_ptr + offs_n[:, None] * stride_sn + offs_g[None, :],
                mask=mask_n[:, None] & (offs_g[None, :] < K // GROUP), other=0.0)  # [BN, R] fp32
    if BITS == 8:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        q = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                    other=0).to(tl.int32)
        w = q.to(tl.float32)
    else:
        # Byte j of the chunk holds k = k0 + (j // (G/2)) * G + j % (G/2) in its low nibble and k + G/2 in
        # its high one (quant.py's layout): two slices of x, each contiguous within a group.
        offs_j = tl.arange(0, BLOCK_K // 2)
        offs_k = k0 + (offs_j // (GROUP // 2)) * GROUP + offs_j % (GROUP // 2)
        mask_k = offs_k < K
        b = tl.load(qw_ptr + offs_n[:, None] * stride_qn + k0 // 2 + offs_j[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0).to(tl.int32)
        lo = ((b & 15) - 8).to(tl.float32)
        hi = ((b >> 4) - 8).to(tl.float32)
    if HAS_BIAS and not SPLIT:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    for m in tl.static_range(ROWS):
        x_row = x_ptr + tl.minimum(m, M - 1) * stride_xm  # rows past M (ROWS is M rounded up) repeat the last
        store_mask = mask_n & (tl.full((BLOCK_N,), m, tl.int32) < M)
        if BITS == 8:
            x = tl.load(x_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            p = tl.sum(tl.reshape(w * x[None, :], (BLOCK_N, R, GROUP)), axis=2)
        else:
            x_lo = tl.load(x_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            x_hi = tl.load(x_row + offs_k + GROUP // 2, mask=mask_k, other=0.0).to(tl.float32)
            p = tl.sum(tl.reshape(lo * x_lo[None, :] + hi * x_hi[None, :], (BLOCK_N, R, GROUP // 2)), axis=2)
        acc = tl.sum(p * s, axis=1)  # [BN]
        if SPLIT:
            tl.store(out_ptr + pid_s * stride_os + m * stride_om + offs_n, acc, mask=store_mask)
        else:
            if HAS_BIAS:
                acc += bias
            tl.store(out_ptr + m * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _split_k_reduce_kernel(ws_ptr, bias_ptr, out_ptr, numel, N, stride_ws,
                           SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    # out [M, N] (contiguous) = sum over s of ws[s] (in order s = 0, 1, ...) + bias.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(ws_ptr + s * stride_ws + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_kernel(qw_ptr, scale_ptr, out_ptr, N, stride_qn, stride_sn, stride_on,
                    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # out[n tile, k tile] = q * s in fp32, cast to out's dtype: the same rounding as QuantizedWeight.dequantize.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    mask_n = offs_n < N
    s = tl.load(scale_ptr + offs_n * stride_sn + k0 // GROUP, mask=mask_n, other=0.0)[:, None]  # [BN, 1]
    odt = out_ptr.dtype.element_ty
    if BITS == 8:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_k[None, :], mask=mask_n[:, None], other=0)
        tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :], (q.to(tl.float32) * s).to(odt),
                 mask=mask_n[:, None])
    else:
        # BLOCK_K == GROUP: the group's G / 2 bytes give its first half (low nibbles) and second half (high).
        offs_j = tl.arange(0, BLOCK_K // 2)
        b = tl.load(qw_ptr + offs_n[:, None] * stride_qn + k0 // 2 + offs_j[None, :], mask=mask_n[:, None],
                    other=0).to(tl.int32)
        dst = out_ptr + offs_n[:, None] * stride_on + k0 + offs_j[None, :]
        tl.store(dst, (((b & 15) - 8).to(tl.float32) * s).to(odt), mask=mask_n[:, None])
        tl.store(dst + BLOCK_K // 2, (((b >> 4) - 8).to(tl.float32) * s).to(odt), mask=mask_n[:, None])


# 16-bit floats whose low mantissa bits hold a nibble exactly (bits, value + 8): bf16 128.0 and fp16 1024.0.
_MAGIC = {torch.bfloat16: (0x4300, 136.0), torch.float16: (0x6400, 1032.0)}


# --- host side ---------------------------------------------------------------------------------------


def pick_config(m: int, n: int, k: int, bits: int, group: int, num_sms: int) -> TileConfig:
    """Tiles for a [m, k] x [k, n] product (first guesses, for a card without a table; benchmarks/wint_kernels.py measures)."""
    block_k = min(group, 128)
    # block_n is the MMA's M (64: a warpgroup's), block_m the narrow N side that holds x's rows.
    if m <= 16:
        block_m, block_n, warps, stages = 16, 64, 4, 4
    elif m <= 32:
        block_m, block_n, warps, stages = 32, 64, 4, 4
    elif m <= 64:
        block_m, block_n, warps, stages = 64, 64, 4, 3
    else:
        block_m, block_n, warps, stages, block_k = 64, 128, 8, 3, min(group, 64)
    programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    tiles = k // block_k
    weight_bytes = n * k * bits // 8
    split = 1
    while (programs * split < TARGET_WAVES * num_sms
           and tiles // (2 * split) >= MIN_TILES_PER_SPLIT
           and 2 * (2 * split) * m * n * 4 <= weight_bytes // 2):  # workspace written and read back
        split *= 2
    return TileConfig(block_m, block_n, block_k, split, warps, stages)


def wint_matmul(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None,
                config: TileConfig | None = None) -> torch.Tensor:
    """x [M, K] (fp16/bf16; fp32 rounds through tf32 on a GPU) -> x @ dequant(w).T + bias, [M, N] in x's dtype."""
    n, k = w.shape
    _check(x, w, bias)
    m = x.shape[0]
    group = w.group_size
    c = config or pick_config(m, n, k, w.method.bits, group, _num_sms(x.device))
    min_k = 16 if w.method.bits == 8 else 32  # tl.dot needs every dimension >= 16
    if group % c.block_k or c.block_k < min_k or min(c.block_m, c.block_n) < 16:
        raise ValueError(f"tile config {c} does not fit group size {group} ({w.method.name})")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    tiles = k // c.block_k
    tiles_per_split = triton.cdiv(tiles, c.split_k)
    split = triton.cdiv(tiles, tiles_per_split)  # no empty split
    grid = (triton.cdiv(m, c.block_m), triton.cdiv(n, c.block_n), split)
    # The bit trick pays where converting dominates (few rows: measured 1.2-1.4x at M <= 16 on an H100) and
    # costs at 64 rows and more, where the per-row bias sums weigh more than the conversions saved.
    magic, offset = _MAGIC.get(x.dtype, (0, 0.0)) if w.method.bits == 4 and c.block_m <= 32 else (0, 0.0)
    common = dict(BITS=w.method.bits, GROUP=group, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                  HAS_BIAS=bias is not None, MAGIC=magic, MAGIC_OFFSET=offset, num_warps=c.num_warps, num_stages=c.num_stages)
    return _launch(_wint_matmul_kernel, grid, split, x, w, bias, out, tiles_per_split, **common)


def _launch(kernel, grid, split: int, x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None,
            out: torch.Tensor, *extra, **constexprs) -> torch.Tensor:
    """Run `kernel` (its arguments: x, weight, scales, bias, out, M, N, K and their strides, then `extra`) into
    `out`, or with K split in `split` parts into an fp32 workspace [split, M, N] summed by `_sum_parts`."""
    (m, n), k = out.shape, x.shape[1]
    args = (m, n, k, x.stride(0), w.qweight.stride(0), w.scales.stride(0))
    if split == 1:
        kernel[grid](x, w.qweight, w.scales, bias if bias is not None else w.scales, out, *args, out.stride(0), 0,
                     *extra, SPLIT=False, **constexprs)
        return out
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    kernel[grid](x, w.qweight, w.scales, w.scales, ws, *args, ws.stride(1), ws.stride(0), *extra, SPLIT=True,
                 **constexprs)
    return _sum_parts(ws, bias, out)


def _sum_parts(ws: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """out [M, N] = the split-K partial sums ws [split, M, N] added in order, plus bias."""
    split, m, n = ws.shape
    block = 1024
    _split_k_reduce_kernel[(triton.cdiv(m * n, block),)](
        ws, bias if bias is not None else ws, out, m * n, n, ws.stride(0), SPLIT_K=split,
        HAS_BIAS=bias is not None, BLOCK=block)
    return out


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # rows of W per program
    block_k: int  # values of K per program: whole groups (a multiple of the group size)
    num_warps: int = 4


def pick_gemv_config(m: int, n: int, k: int, bits: int, group: int) -> GemvConfig:
    """The no-loop kernel's chunk for a [m, k] x [k, n] product (benchmarks/wint_kernels.py measures)."""
    return GemvConfig(block_n=8, block_k=max(group, 1024), num_warps=4)


def wint_gemv(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None,
              config: GemvConfig | None = None) -> torch.Tensor:
    """x [M, K] with few rows (decode) -> x @ dequant(w).T + bias, in the no-loop kernel (see its comment)."""
    n, k = w.shape
    _check(x, w, bias)
    m = x.shape[0]
    group = w.group_size
    c = config or pick_gemv_config(m, n, k, w.method.bits, group)
    if c.block_k % group or c.block_n < 1:
        raise ValueError(f"gemv config {c} does not fit group size {group} ({w.method.name})")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    rows = triton.next_power_of_2(m)
    split = triton.cdiv(k, c.block_k)
    common = dict(BITS=w.method.bits, GROUP=group, ROWS=rows, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                  HAS_BIAS=bias is not None, num_warps=c.num_warps)
    grid = (triton.cdiv(n, c.block_n), split)
    return _launch(_wint_gemv_kernel, grid, split, x, w, bias, out, **common)


def dequantize_weight(w: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The [N, K] weight in `dtype`, in one kernel (the same values as `w.dequantize(dtype)`)."""
    n, k = w.shape
    out = torch.empty(n, k, dtype=dtype, device=w.device)
    block_n, block_k = 32, w.group_size
    _dequant_kernel[(triton.cdiv(n, block_n), k // block_k)](
        w.qweight, w.scales, out, n, w.qweight.stride(0), w.scales.stride(0), out.stride(0),
        BITS=w.method.bits, GROUP=w.group_size, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out


def _check(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None) -> None:
    n, k = w.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}] for a {w.method.name} weight {tuple(w.shape)}, got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.stride(1) != 1:
        raise ValueError("x must be contiguous along K")
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but the weight on {w.device}")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{n}] tensor, got {tuple(bias.shape)}")


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count
