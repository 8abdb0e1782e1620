"""x @ dequant(W)^T for wint8/wint4 weights (pdlab/models/quant.py) in Triton.

Two paths, picked by the number of rows M of x (`wint_linear`):

- M < DEQUANT_MIN_M (decode, small prefill chunks): `wint_matmul`, one kernel
  that loads the packed int8/int4 tile and the group scales, converts the
  integers to x's dtype in registers (exact: |q| <= 127) and multiplies with
  tl.dot into an fp32 accumulator, as out^T = W x^T: the weight tile is the
  MMA's left operand, used from registers in its natural [N, K] layout, and
  x's few rows the narrow right one (with W on the right, the converted tile
  went through shared memory in the MMA's layout and the kernel ran at 15-40%
  of the copy bandwidth on an H200); each K tile lies inside one group, so the
  group's scale multiplies the tile's partial product (one multiply per
  output, not per weight). A wint4 tile's low and high nibbles hold the two
  halves of a group (quant.py's layout), so each multiplies one contiguous
  slice of x: all loads are vectorized and asynchronously prefetched (cp.async
  in the sm_90 code Triton 3.9 emits). Small M is memory-bound: every packed
  byte is read once (all of M in one M tile up to 64 rows), the N tile is
  64 rows of W (one warpgroup's MMA) and K is split over `split_k` programs until there
  are about two waves of programs on the card. Split-K partial sums go to an
  fp32 workspace [split_k, M, N] that a second small kernel sums in a fixed
  order, adding the bias and casting: deterministic (atomics are not), and one
  extra launch where atomics would need two (a memset and the cast). The
  workspace's traffic (written, then read back) is kept under half of the
  weight's bytes, which caps split_k at M = 64.
- M >= DEQUANT_MIN_M (prefill): dequantize the weight into a scratch [N, K]
  tensor of x's dtype (one Triton kernel, 2.5-3 bytes of traffic per weight)
  and call cuBLAS through F.linear. There the matmul is compute-bound and
  cuBLAS's MMA efficiency beats a kernel that also dequantizes; the scratch is
  transient (the largest linear's [N, K] in bf16, e.g. 235 MB for llama3-8b's
  gate_up) and comes out of the engine's activation reserve.

DEQUANT_MIN_M = 512 is an estimate, not a measurement: dequantizing costs a
fixed 2.5-3 B of traffic per weight (read q, write bf16), which cuBLAS's
faster MMA (taken as ~750 against ~450-550 TFLOP/s for a fused kernel) repays
from M ~ 470-860. benchmarks/wint_matmul.py times both paths at
M = 256..2048 and prints the crossover, and `--sweep` the best tile
configuration per shape and M; set both from its output.

fp32 activations on CUDA take the dequantize + F.linear path: tl.dot on fp32
would round through tf32. In Triton's interpreter (TRITON_INTERPRET=1, CPU
tensors) the kernels run on fp16 and fp32; bf16 is wrong there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from pdlab.models.quant import QuantizedWeight

DEQUANT_MIN_M = 512
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
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
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
            lo = ((b & 15) - 8).to(dt)
            hi = ((b >> 4) - 8).to(dt)
            s = tl.load(scale_ptr + offs_n * stride_sn + k_lo // GROUP, mask=mask_n, other=0.0)
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


# --- host side ---------------------------------------------------------------------------------------


def pick_config(m: int, n: int, k: int, bits: int, group: int, num_sms: int) -> TileConfig:
    """Tiles for a [m, k] x [k, n] product (first guesses; benchmarks/wint_matmul.py --sweep measures)."""
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
    has_bias = bias is not None
    common = dict(BITS=w.method.bits, GROUP=group, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
                  HAS_BIAS=has_bias, num_warps=c.num_warps, num_stages=c.num_stages)
    if split == 1:
        _wint_matmul_kernel[grid](
            x, w.qweight, w.scales, bias if has_bias else w.scales, out,
            m, n, k, x.stride(0), w.qweight.stride(0), w.scales.stride(0), out.stride(0), 0, tiles_per_split,
            SPLIT=False, **common)
        return out
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x.device)  # [split, M, N] partial sums
    _wint_matmul_kernel[grid](
        x, w.qweight, w.scales, w.scales, ws,
        m, n, k, x.stride(0), w.qweight.stride(0), w.scales.stride(0), ws.stride(1), ws.stride(0), tiles_per_split,
        SPLIT=True, **common)
    block = 1024
    _split_k_reduce_kernel[(triton.cdiv(m * n, block),)](
        ws, bias if has_bias else ws, out, m * n, n, ws.stride(0), SPLIT_K=split, HAS_BIAS=has_bias, BLOCK=block)
    return out


def dequantize_weight(w: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The [N, K] weight in `dtype`, in one kernel (the same values as `w.dequantize(dtype)`)."""
    n, k = w.shape
    out = torch.empty(n, k, dtype=dtype, device=w.device)
    block_n, block_k = 32, w.group_size
    _dequant_kernel[(triton.cdiv(n, block_n), k // block_k)](
        w.qweight, w.scales, out, n, w.qweight.stride(0), w.scales.stride(0), out.stride(0),
        BITS=w.method.bits, GROUP=w.group_size, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out


def wint_linear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None,
                dequant_min_m: int = DEQUANT_MIN_M) -> torch.Tensor:
    """x [..., K] -> [..., N]: the fused kernel below `dequant_min_m` rows, else dequantize + cuBLAS."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[-1] and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] >= dequant_min_m or x.dtype == torch.float32:
        out = F.linear(x2, dequantize_weight(w, x.dtype), bias)
    else:
        out = wint_matmul(x2, w, bias)
    return out.view(*lead, out.shape[-1])


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
