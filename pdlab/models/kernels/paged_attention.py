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
of the registers and time of "ieee" FMA dots); fp16 and bf16 as themselves.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Flash-decoding split rule (untuned; benchmarks/attention_kernels.py measures it).
MIN_SPLIT_TOKENS = 128  # never split a context into pieces shorter than this
MAX_SPLITS = 32
PROGRAMS_PER_SM = 2  # aim for this many decode programs per SM


# Integers that change from step to step (the block table's width, the split length) are not specialized on
# (divisible by 16 or not): each specialization is another compilation, of ~1 s, in the middle of serving.
@triton.jit(do_not_specialize=["split_len", "stride_bt", "stride_mob", "stride_moh", "stride_mos", "stride_mlb",
                               "stride_mlh"])
def _decode_kernel(
    Q, K, V, Out, MidO, MidLse, BlockTable, SeqLens, Rows,
    qk_scale, split_len,  # qk_scale: the softmax scale times log2(e)
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_bt,
    stride_mob, stride_moh, stride_mos,
    stride_mlb, stride_mlh,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, HAS_ROWS: tl.constexpr, DIRECT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if HAS_ROWS:
        row = tl.load(Rows + seq)  # the sequence's token in the flat batch
    else:
        row = seq
    seq_len = tl.load(SeqLens + seq)
    start = split * split_len
    end = tl.minimum(seq_len, start + split_len)

    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < GROUP
    heads = kv_head * GROUP + offs_h
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(Q + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_H, D_PAD]

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D_PAD], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        block = tl.load(BlockTable + seq * stride_bt + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot = offs_n % BLOCK_SIZE
        if HEAD_DIM == D_PAD:  # a mask that varies along head_dim would stop vectorized loads
            k_mask = n_mask[None, :]
            v_mask = n_mask[:, None]
        else:
            k_mask = d_mask[:, None] & n_mask[None, :]
            v_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K + block[None, :] * stride_kb + slot[None, :] * stride_kt + kv_head * stride_kh + offs_d[:, None],
                    mask=k_mask, other=0.0)  # [D_PAD, BLOCK_N]
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_H, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + block[:, None] * stride_vb + slot[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                    mask=v_mask, other=0.0)  # [BLOCK_N, D_PAD]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # l_i >= 1 once a key was seen; 0 only for an empty split (or a padded sequence of length 0).
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    mask = h_mask[:, None] & d_mask[None, :]
    if DIRECT:
        tl.store(Out + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(Out.dtype.element_ty), mask=mask)
    else:
        lse = m_i + tl.log2(l_safe)  # -inf for an empty split: it gets weight 0 in the merge
        tl.store(MidO + seq * stride_mob + heads[:, None] * stride_moh + split * stride_mos + offs_d[None, :],
                 o, mask=mask)
        tl.store(MidLse + seq * stride_mlb + heads * stride_mlh + split, lse, mask=h_mask)


@triton.jit(do_not_specialize=["num_splits", "stride_mob", "stride_moh", "stride_mos", "stride_mlb", "stride_mlh"])
def _decode_merge_kernel(
    MidO, MidLse, Out, Rows, num_splits,
    stride_mob, stride_moh, stride_mos,
    stride_mlb, stride_mlh,
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr, HAS_ROWS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    if HAS_ROWS:
        row = tl.load(Rows + seq)
    else:
        row = seq
    offs_s = tl.arange(0, S_PAD)
    s_mask = offs_s < num_splits
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(MidLse + seq * stride_mlb + head * stride_mlh + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.maximum(tl.max(lse, 0), -1e30)  # finite even when every split is empty
    w = tl.exp2(lse - m)  # [S_PAD]
    o = tl.load(MidO + seq * stride_mob + head * stride_moh + offs_s[:, None] * stride_mos + offs_d[None, :],
                mask=s_mask[:, None] & d_mask[None, :], other=0.0)  # [S_PAD, D_PAD]
    # The split holding the maximum has weight 1, so the sum is >= 1 unless no split saw a key.
    out = tl.sum(o * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1.0)
    tl.store(Out + row * stride_ot + head * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=d_mask)


@triton.jit
def _prefill_tiles(
    acc, l_i, m_i, q, q_pos, K, V, BlockTable, seq, kv_head, lo, hi, qk_scale,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        block = tl.load(BlockTable + seq * stride_bt + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot = offs_n % BLOCK_SIZE
        if HEAD_DIM == D_PAD:  # a mask that varies along head_dim would stop vectorized loads
            k_mask = n_mask[None, :]
            v_mask = n_mask[:, None]
        else:
            k_mask = d_mask[:, None] & n_mask[None, :]
            v_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K + block[None, :] * stride_kb + slot[None, :] * stride_kt + kv_head * stride_kh + offs_d[:, None],
                    mask=k_mask, other=0.0)  # [D_PAD, BLOCK_N]
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if CAUSAL:
            s = tl.where((offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + block[:, None] * stride_vb + slot[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                    mask=v_mask, other=0.0)  # [BLOCK_N, D_PAD]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(
    Q, K, V, Out, BlockTable, QStart, QLen, SeqLen,
    qk_scale,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_bt,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_len = tl.load(QLen + seq)
    m_start = tile * BLOCK_M
    if m_start >= q_len:  # the grid covers the longest chunk of the step
        return
    q_start = tl.load(QStart + seq)
    seq_len = tl.load(SeqLen + seq)
    cached = seq_len - q_len  # positions before this chunk
    kv_head = head // GROUP

    offs_m = m_start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_len
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    rows = q_start + offs_m
    q = tl.load(Q + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, D_PAD]
    q_pos = cached + offs_m  # [BLOCK_M]; padding rows sit past seq_len and are never stored

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    # Keys [0, first query's position) are seen by every query of the tile: no causal mask there.
    full = ((cached + m_start) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(seq_len, cached + m_start + BLOCK_M)
    acc, l_i, m_i = _prefill_tiles(
        acc, l_i, m_i, q, q_pos, K, V, BlockTable, seq, kv_head, 0, full, qk_scale,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
        BLOCK_N, BLOCK_SIZE, HEAD_DIM, D_PAD, False, DOT_PRECISION)
    # Every row sees key `full` (<= its own position) in the first masked tile, so no row stays at -inf.
    acc, l_i, m_i = _prefill_tiles(
        acc, l_i, m_i, q, q_pos, K, V, BlockTable, seq, kv_head, full, hi, qk_scale,
        stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
        BLOCK_N, BLOCK_SIZE, HEAD_DIM, D_PAD, True, DOT_PRECISION)
    o = acc / l_i[:, None]
    tl.store(Out + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             o.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


# --- launchers ----------------------------------------------------------------------


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
