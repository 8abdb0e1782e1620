"""Attention over the paged KV cache, and the per-forward context that carries its metadata.

The model calls `ctx.attention(layer_idx, q, k, v)`: the context stores this
step's k and v into the cache at `slot_mapping`, then attends each request's
queries over all of its cached positions. This file holds the portable
PyTorch path (the reference, and the CPU path); GPU kernels implement the
same `attention` contract.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdlab.engine.kv_cache import KVCache


@dataclass
class SeqSlice:
    """One request's part of a step: queries [q_start, q_start + q_len) of the flat batch."""

    q_start: int
    q_len: int
    seq_len: int  # cached positions after this step, including the new ones
    block_ids: list[int]


@dataclass
class AttentionContext:
    kv_cache: KVCache
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of each new token
    seqs: list[SeqSlice]
    # Requests with one query each (decodes), attended together in one batched call.
    decode_rows: torch.Tensor  # [B_dec] int64: their token indices in the flat batch
    decode_block_table: torch.Tensor  # [B_dec, max_blocks] int64, padded with 0
    decode_seq_lens: torch.Tensor  # [B_dec] int64
    # Requests with several queries (prefill chunks), attended one by one.
    prefill_seqs: list[SeqSlice]
    # Runs after each layer's new K and V are stored (a KV transfer starts there).
    on_kv_written: Callable[[int], None] | None = None

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, H_kv, D] for the step's new tokens. Returns [T, H, D]."""
        k_cache, v_cache = self.kv_cache.layer(layer_idx)  # [N, bs, H_kv, D]
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, self.slot_mapping, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, self.slot_mapping, v)
        if self.on_kv_written is not None:
            self.on_kv_written(layer_idx)
        out = torch.empty_like(q)
        if self.decode_rows.numel():
            out[self.decode_rows] = self._decode(q[self.decode_rows], k_cache, v_cache)
        for s in self.prefill_seqs:
            out[s.q_start: s.q_start + s.q_len] = self._prefill(q[s.q_start: s.q_start + s.q_len], s, k_cache, v_cache)
        return out

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        k = k_cache[self.decode_block_table].flatten(1, 2)  # [B, max_blocks * bs, H_kv, D]
        v = v_cache[self.decode_block_table].flatten(1, 2)
        positions = torch.arange(k.shape[1], device=q.device)
        mask = (positions[None, :] < self.decode_seq_lens[:, None])[:, None, None, :]  # [B, 1, 1, S]
        out = F.scaled_dot_product_attention(
            q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True
        )  # [B, H, 1, D]
        return out[:, :, 0, :]

    def _prefill(self, q: torch.Tensor, s: SeqSlice, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        blocks = torch.tensor(s.block_ids, device=q.device)
        k = k_cache[blocks].flatten(0, 1)[: s.seq_len]  # [S, H_kv, D]
        v = v_cache[blocks].flatten(0, 1)[: s.seq_len]
        if s.q_len == s.seq_len:  # a whole prompt: plain causal attention (lets SDPA pick a fused kernel)
            mask, causal = None, True
        else:  # a chunk after cached positions: query i sits at seq_len - q_len + i and sees keys up to there
            q_pos = torch.arange(s.seq_len - s.q_len, s.seq_len, device=q.device)
            mask, causal = torch.arange(s.seq_len, device=q.device)[None, :] <= q_pos[:, None], False  # [q_len, S]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, is_causal=causal, enable_gqa=True
        )  # [H, q_len, D]
        return out.transpose(0, 1)
