"""Attention over the paged KV cache, and the per-forward context that carries its metadata.

The model stores this step's k and v into the cache at `slot_mapping`
(`ctx.store_kv`, or a fused kernel), then calls `ctx.attend(layer_idx, q)`,
which attends each request's queries over all of its cached positions
(`ctx.attention` does both). Two backends implement that
contract:
- "torch": portable PyTorch (the reference, and the CPU path): decodes in one
  batched SDPA call over a padded gather, prefill chunks one by one;
- "triton": the kernels of pdlab/models/kernels/paged_attention.py, one
  launch for the decodes and one for all prefill chunks of the step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from pdlab.models.kernels import triton_available, triton_interpreted
from pdlab.models.kv_cache import KVCache
from pdlab.errors import ConfigError

AttentionBackend = Literal["torch", "triton"]
ATTENTION_BACKENDS = ("auto", "torch", "triton")


def resolve_attention_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """auto: triton on CUDA when Triton imports, else torch. Raises ConfigError naming the problem."""
    device = torch.device(device)
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}; got {name!r}")
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise ConfigError("attention_backend 'triton' needs the triton package, which does not import here")
        if device.type == "cpu" and not triton_interpreted():
            raise ConfigError("attention_backend 'triton' on a CPU runs only in Triton's interpreter: "
                              "set TRITON_INTERPRET=1 before starting (slow; for tests)")
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"attention_backend 'triton' runs on CUDA devices, not {device.type}")
    return name


@dataclass
class SeqSlice:
    """One request's part of a step: queries [q_start, q_start + q_len) of the flat batch."""

    q_start: int
    q_len: int
    seq_len: int  # cached positions after this step, including the new ones
    block_ids: list[int]


@dataclass
class AttentionContext:
    """Per-step metadata, built once per step (`build`) and read by every layer.

    All int32 tensors live in one buffer, copied to the device in one go.
    """

    kv_cache: KVCache
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of each new token
    seqs: list[SeqSlice]
    # Requests with one query each (decodes), attended together in one batched call.
    decode_rows: torch.Tensor  # [B_dec] int32: their token indices in the flat batch
    decode_block_table: torch.Tensor  # [B_dec, max_blocks] int32, padded with 0
    decode_seq_lens: torch.Tensor  # [B_dec] int32
    # Requests with several queries (prefill chunks): one by one (torch), or in one launch (triton).
    prefill_seqs: list[SeqSlice]
    prefill_q_start: torch.Tensor  # [N_pre] int32: first query's row in the flat batch
    prefill_q_len: torch.Tensor  # [N_pre] int32
    prefill_seq_len: torch.Tensor  # [N_pre] int32: cached positions including the chunk
    prefill_block_table: torch.Tensor  # [N_pre, max_blocks] int32, padded with 0
    prefill_max_q_len: int  # sizes the prefill kernel's grid
    backend: AttentionBackend = "torch"
    # Runs after each layer's new K and V are stored (a KV transfer starts there).
    on_kv_written: Callable[[int], None] | None = None

    @classmethod
    def build(
        cls,
        kv_cache: KVCache,
        seqs: list[SeqSlice],
        slot_mapping: torch.Tensor,
        backend: AttentionBackend = "torch",
    ) -> AttentionContext:
        """Split the step's sequences into decodes (q_len == 1) and prefill chunks and pad their tables."""
        decodes = [s for s in seqs if s.q_len == 1]
        prefills = [s for s in seqs if s.q_len > 1]
        max_dec = max((len(s.block_ids) for s in decodes), default=0)
        max_pre = max((len(s.block_ids) for s in prefills), default=0)
        host: list[int] = [s.q_start for s in decodes]
        host += [s.seq_len for s in decodes]
        for s in decodes:
            host += s.block_ids
            host += [0] * (max_dec - len(s.block_ids))
        host += [s.q_start for s in prefills]
        host += [s.q_len for s in prefills]
        host += [s.seq_len for s in prefills]
        for s in prefills:
            host += s.block_ids
            host += [0] * (max_pre - len(s.block_ids))
        buf = copy_to_device(torch.tensor(host, dtype=torch.int32), slot_mapping.device)
        B, N = len(decodes), len(prefills)
        pieces = buf.split([B, B, B * max_dec, N, N, N, N * max_pre])
        return cls(
            kv_cache=kv_cache,
            slot_mapping=slot_mapping,
            seqs=seqs,
            decode_rows=pieces[0],
            decode_seq_lens=pieces[1],
            decode_block_table=pieces[2].view(B, max_dec),
            prefill_seqs=prefills,
            prefill_q_start=pieces[3],
            prefill_q_len=pieces[4],
            prefill_seq_len=pieces[5],
            prefill_block_table=pieces[6].view(N, max_pre),
            prefill_max_q_len=max((s.q_len for s in prefills), default=0),
            backend=backend,
        )

    def attention(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, H_kv, D] for the step's new tokens. Returns [T, H, D]."""
        self.store_kv(layer_idx, k, v)
        return self.attend(layer_idx, q)

    def store_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the step's new k, v [T, H_kv, D] at their slots of the layer's cache."""
        k_cache, v_cache = self.kv_cache.layer(layer_idx)  # [N, bs, H_kv, D]
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, self.slot_mapping, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, self.slot_mapping, v)

    def attend(self, layer_idx: int, q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of q [T, H, D] over the cache, the step's new K and V already stored: the rows of the
        step's sequences of `out` (a new tensor if None), returned [T, H, D]."""
        if self.on_kv_written is not None:
            self.on_kv_written(layer_idx)
        k_cache, v_cache = self.kv_cache.layer(layer_idx)
        out = torch.empty_like(q) if out is None else out
        if self.backend == "triton":
            return self._attention_triton(q, k_cache, v_cache, out)
        if self.decode_rows.numel():
            out[self.decode_rows] = decode_torch(q[self.decode_rows], k_cache, v_cache,
                                                 self.decode_block_table, self.decode_seq_lens)
        for s in self.prefill_seqs:
            out[s.q_start: s.q_start + s.q_len] = prefill_torch(q[s.q_start: s.q_start + s.q_len], k_cache, v_cache,
                                                                s.block_ids, s.seq_len)
        return out

    def _attention_triton(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          out: torch.Tensor) -> torch.Tensor:
        from pdlab.models.kernels import paged_attention as kernels  # imports Triton on first use only

        # Every row of out is written by exactly one of the two launches.
        if self.decode_rows.numel():
            kernels.paged_decode_attention(q, k_cache, v_cache, self.decode_block_table, self.decode_seq_lens,
                                           rows=self.decode_rows, out=out)
        if self.prefill_seqs:
            kernels.paged_prefill_attention(q, k_cache, v_cache, self.prefill_block_table, self.prefill_q_start,
                                            self.prefill_q_len, self.prefill_seq_len, self.prefill_max_q_len, out=out)
        return out


def copy_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One copy of a host tensor built this step (pinned first on CUDA, so the copy does not stall the host)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def decode_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor) -> torch.Tensor:
    """q: [B, H, D], one query per sequence at its last position; block_table [B, max_blocks]. Returns [B, H, D]."""
    k = k_cache[block_table].flatten(1, 2)  # [B, max_blocks * bs, H_kv, D]
    v = v_cache[block_table].flatten(1, 2)
    positions = torch.arange(k.shape[1], device=q.device)
    mask = (positions[None, :] < seq_lens[:, None])[:, None, None, :]  # [B, 1, 1, S]
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True
    )  # [B, H, 1, D]
    return out[:, :, 0, :]


def prefill_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: list[int],
                  seq_len: int) -> torch.Tensor:
    """q: [q_len, H, D], queries at positions [seq_len - q_len, seq_len) of one sequence. Returns [q_len, H, D]."""
    q_len = q.shape[0]
    blocks = torch.tensor(block_ids, device=q.device)
    k = k_cache[blocks].flatten(0, 1)[:seq_len]  # [S, H_kv, D]
    v = v_cache[blocks].flatten(0, 1)[:seq_len]
    if q_len == seq_len:  # a whole prompt: plain causal attention (lets SDPA pick a fused kernel)
        mask, causal = None, True
    else:  # a chunk after cached positions: query i sits at seq_len - q_len + i and sees keys up to there
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask, causal = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None], False  # [q_len, S]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, is_causal=causal, enable_gqa=True
    )  # [H, q_len, D]
    return out.transpose(0, 1)
