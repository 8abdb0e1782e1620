"""The Triton kernels of the paged attention (device code); paged_attention.py launches them.

Cache layout, tiling and the online softmax: see paged_attention.py's docstring.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
