"""Triton attention over the paged KV cache: decode (flash-decoding) and varlen prefill.

Cache layout (pdlab/models/kv_cache.py): k_cache, v_cache [num_blocks, block_size, H_kv, D];
position p of a sequence lives in block `block_table[p // block_size]` at offset
`p % block_size`. Both kernels gather keys token by token through the block
table, so one tile of BLOCK_N keys may span several cache blocks: any block
size works, and tiles stay >= 16 for tl.dot. head_dim is padded to a power of
two (>= 16) inside the kernels, with masks.

- decode: one query per sequence. A program owns one (sequence, KV head,
  split) and all G = H / H_kv query heads of that KV head, as the rows of a
  [max(16, G), D] tile, so each K/V tile is read once per group. When
  B * H_kv programs cannot fill the GPU and contexts are long, the context is
  split across programs (flash-decoding): each writes a partial output and its
  log-sum-exp, and a small kernel merges them. The split count comes from
  shapes only (batch, KV heads, block-table width, SM count), never from GPU
  data, so a decode launch does no host sync and can be captured in a CUDA
  graph.
- prefill: all chunks of a step in one launch. A program owns BLOCK_M queries
  of one sequence and one head; query i of a chunk sits at position
  seq_len - q_len + i and sees keys up to its own. Key tiles that every query
  of the tile sees run without the causal mask; the tiles across the diagonal
  run with it.

Softmax is online, in float32, in base 2 (the scale folds in log2(e)). fp32
inputs multiply as tf32x3 on tensor cores (about fp32's accuracy, a fraction
of the registers and time of "ieee" FMA dots); fp16 and bf16 as themselves. The kernels themselves are in
paged_attention_kernels.py; this module checks the inputs, picks the tiles and the split, and launches them.
"""

from __future__ import annotations

import functools

import torch
import triton

from pdlab.models.kernels.paged_attention_kernels import (
    _decode_kernel, _decode_merge_kernel, _prefill_kernel,
)

LOG2E = 1.4426950408889634
# Flash-decoding split rule (untuned; benchmarks/attention_kernels.py measures it).
MIN_SPLIT_TOKENS = 128  # never split a context into pieces shorter than this
MAX_SPLITS = 32
PROGRAMS_PER_SM = 2  # aim for this many decode programs per SM


def num_decode_splits(num_seqs: int, num_kv_heads: int, max_context_tokens: int, num_sms: int) -> int:
    """How many programs share one (sequence, KV head) in decode: a power of two, from host-known sizes only.

    1 when B * H_kv programs already fill the GPU or the context is short;
    else enough splits for PROGRAMS_PER_SM programs per SM, each split keeping
    at least MIN_SPLIT_TOKENS of the context.
    """
    programs = num_seqs * num_kv_heads
    if programs <= 0 or programs >= num_sms or max_context_tokens < 2 * MIN_SPLIT_TOKENS:
        return 1
    wanted = min(triton.cdiv(PROGRAMS_PER_SM * num_sms, programs), max_context_tokens // MIN_SPLIT_TOKENS, MAX_SPLITS)
    return 1 << (max(wanted, 1).bit_length() - 1)  # round down to a power of two: few distinct launches


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter runs programs one after another: splitting buys nothing
    return torch.cuda.get_device_properties(device).multi_processor_count


def _padded_head_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would run as plain tf32 (10-bit mantissa) by default; tf32x3 keeps fp32's accuracy.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor) -> None:
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype or out.dtype != q.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}, "
                         f"out {out.dtype}")
    if k_cache.shape != v_cache.shape or q.shape[-1] != k_cache.shape[-1] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"shapes do not fit: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim")


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """One query per sequence over its cached positions [0, seq_len).

    q: [B, H, D], or with `rows` [T, H, D] of which sequence b's query is row
    rows[b] (int32 [B]); k_cache, v_cache: [num_blocks, block_size, H_kv, D];
    block_table: int32 [B, max_blocks], padded with any valid block id;
    seq_lens: int32 [B] (0 is allowed: that output is 0). Writes out (same
    shape as q; only the rows of the B sequences) and returns it.
    `num_splits` defaults to `num_decode_splits` of the shapes: the launch
    reads no GPU data on the host.
    """
    out = torch.empty_like(q) if out is None else out
    _check(q, k_cache, v_cache, out)
    num_seqs = block_table.shape[0]
    if num_seqs == 0:
        return out
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    num_heads = q.shape[1]
    group = num_heads // num_kv_heads
    d_pad = _padded_head_dim(head_dim)
    block_n = 64 if d_pad <= 128 else 32
    max_context = block_table.shape[1] * block_size
    if num_splits is None:
        num_splits = num_decode_splits(num_seqs, num_kv_heads, max_context, _num_sms(q.device))
    split_len = triton.cdiv(triton.cdiv(max_context, num_splits), block_n) * block_n
    direct = num_splits == 1
    if direct:
        mid_o = mid_lse = out  # unused
        mid_strides = (0, 0, 0, 0, 0)
    else:
        mid_o = torch.empty((num_seqs, num_heads, num_splits, d_pad), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
        mid_strides = (*mid_o.stride()[:3], *mid_lse.stride()[:2])
    has_rows = rows is not None
    rows_arg = rows if has_rows else seq_lens  # unused without rows
    qk_scale = (head_dim ** -0.5 if scale is None else scale) * LOG2E
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, mid_o, mid_lse, block_table, seq_lens, rows_arg,
        qk_scale, split_len,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_table.stride(0),
        *mid_strides,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, D_PAD=d_pad, HAS_ROWS=has_rows, DIRECT=direct, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=4, num_stages=2,
    )
    if not direct:
        _decode_merge_kernel[(num_seqs, num_heads)](
            mid_o, mid_lse, out, rows_arg, num_splits,
            *mid_strides,
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, D_PAD=d_pad, S_PAD=triton.next_power_of_2(num_splits), HAS_ROWS=has_rows,
            num_warps=4,
        )
    return out


def _prefill_config(d_pad: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a padded head_dim (untuned starting points).

    Shared memory holds the Q tile and num_stages K and V tiles: fp32 gets smaller tiles.
    """
    if d_pad <= 64:
        return 64, 64, 4, 2
    if d_pad <= 128 and dtype != torch.float32:
        return 128, 64, 8, 2
    return 64, 32, 4, 1


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    seq_len: torch.Tensor,
    max_q_len: int,
    *,
    out: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """All prefill chunks of a step in one launch (varlen, causal with offset).

    q: [T, H, D], the flat batch; sequence n's queries are rows
    [q_start[n], q_start[n] + q_len[n]) and sit at positions
    [seq_len[n] - q_len[n], seq_len[n]); its keys (already in the cache,
    including this chunk's) are at [0, seq_len[n]) through block_table[n].
    q_start, q_len, seq_len: int32 [N]; block_table: int32 [N, max_blocks];
    max_q_len: a host int >= every q_len (sizes the grid). Writes those rows
    of out (same shape as q) and returns it.
    """
    out = torch.empty_like(q) if out is None else out
    _check(q, k_cache, v_cache, out)
    num_seqs = block_table.shape[0]
    if num_seqs == 0 or max_q_len <= 0:
        return out
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    num_heads = q.shape[1]
    d_pad = _padded_head_dim(head_dim)
    block_m, block_n, num_warps, num_stages = _prefill_config(d_pad, q.dtype)
    qk_scale = (head_dim ** -0.5 if scale is None else scale) * LOG2E
    _prefill_kernel[(triton.cdiv(max_q_len, block_m), num_seqs, num_heads)](
        q, k_cache, v_cache, out, block_table, q_start, q_len, seq_len,
        qk_scale,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_table.stride(0),
        GROUP=num_heads // num_kv_heads, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, D_PAD=d_pad, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
