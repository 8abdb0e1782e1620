"""Decode steps replayed from CUDA graphs: one per batch size in a set, a step padded to the next size up.

A decode step of a small batch is a few hundred kernel launches whose host
cost exceeds their GPU time (docs/facts.md: HF `generate` is 12x the HBM floor,
mostly launch overhead). Each graph captures the model's forward pass for B
decode queries reading its inputs from static buffers:

    input_ids, positions, slot_mapping : [B]            (int64)
    seq_lens                           : [B]            (int32)
    block_table                        : [B, max_blocks] (int32; max_blocks = max_model_len / block_size)

and leaves the final hidden states [B, hidden] in a static output; the LM
head runs outside the graph on the rows that sample. A step of n <= B decodes
fills the first n rows and pads the rest: seq_len 0 (the attention kernels
write zeros for them) and the slot of the KV cache's scratch block, so that
their K and V writes land in a block no request owns.

Graphs are captured once, largest first, in one memory pool, after the KV
cache is allocated. Only steps that are all decodes, make no KV transfer and
fit the largest size replay; everything else runs eagerly. With tensor
parallelism every rank captures and replays the same graphs in lockstep (the
decision depends only on the step's inputs, which every rank has), NCCL
all-reduces included. If capture fails on any rank, every rank runs eagerly
and the reason is logged.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from pdlab.models.attention import AttentionContext, copy_to_device

if TYPE_CHECKING:
    from pdlab.engine.model_runner import ModelRunner, StepInputs

log = logging.getLogger("pdlab.engine")

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
NUM_WARMUP = 2


def batch_sizes(max_num_seqs: int, sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES) -> list[int]:
    """The captured sizes: the defaults up to max_num_seqs, and max_num_seqs itself."""
    return sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs})


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_num_seqs: int, max_model_len: int) -> None:
        kv_cache = runner.kv_cache
        self.runner = runner
        self.device = runner.device
        self.sizes = batch_sizes(max_num_seqs)
        self.max_batch = self.sizes[-1]
        self.max_blocks = -(-max_model_len // kv_cache.block_size)
        self.scratch_slot = kv_cache.scratch_slot
        if self.scratch_slot is None:
            raise ValueError("CUDA graphs need a KV cache with a scratch block for the padding rows")
        B, W = self.max_batch, self.max_blocks
        self.ints64 = torch.zeros(3 * B, dtype=torch.int64, device=self.device)  # ids, positions, slots
        self.ints32 = torch.zeros(2 * B + B * W, dtype=torch.int32, device=self.device)  # rows, seq_lens, table
        self.ints32[:B] = torch.arange(B, dtype=torch.int32, device=self.device)  # row b is query b
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # batch size -> its static hidden states [B, hidden]
        self.num_replays = 0

    # --- capture -------------------------------------------------------------------------------------

    def _context(self, size: int) -> AttentionContext:
        B, W = self.max_batch, self.max_blocks
        ids, pos, slots = self.ints64.split([B, B, B])
        rows, seq_lens, table = self.ints32.split([B, B, B * W])
        empty = torch.zeros(0, dtype=torch.int32, device=self.device)
        return AttentionContext(
            kv_cache=self.runner.kv_cache, slot_mapping=slots[:size], seqs=[],
            decode_rows=rows[:size], decode_block_table=table.view(B, W)[:size], decode_seq_lens=seq_lens[:size],
            prefill_seqs=[], prefill_q_start=empty, prefill_q_len=empty, prefill_seq_len=empty,
            prefill_block_table=empty.view(0, 0), prefill_max_q_len=0, backend=self.runner.attention_backend,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size (all ranks at once with tensor parallelism). Raises on failure."""
        B = self.max_batch
        ids, pos, slots = self.ints64.split([B, B, B])
        slots.fill_(self.scratch_slot)  # capture-time writes land in the scratch block too
        pool = None
        model = self.runner.model
        for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its pool
            ctx = self._context(size)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(NUM_WARMUP):
                    model(ids[:size], pos[:size], ctx)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = model(ids[:size], pos[:size], ctx)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)

    # --- replay --------------------------------------------------------------------------------------

    def can_run(self, inputs: StepInputs) -> bool:
        n = len(inputs.seqs)
        return (0 < n <= self.max_batch and not inputs.pushes and len(inputs.input_ids) == n
                and all(len(s.block_ids) <= self.max_blocks for s in inputs.seqs))

    def run(self, inputs: StepInputs) -> torch.Tensor:
        """The hidden states [n, hidden] of a decode-only step of n sequences (`can_run` first)."""
        n = len(inputs.seqs)
        size = next(s for s in self.sizes if s >= n)
        B, W = self.max_batch, self.max_blocks
        pad = size - n
        # One host buffer per dtype, copied into the static buffers (rows stay as captured). Only the
        # table's first `width` columns are written: a row's later entries are stale block ids (of this
        # cache, so in range) that the kernels never read past the row's seq_len.
        ints64 = torch.tensor([*inputs.input_ids, *[0] * pad, *inputs.positions, *[0] * pad,
                               *inputs.slots, *[self.scratch_slot] * pad], dtype=torch.int64)
        width = max(len(s.block_ids) for s in inputs.seqs)
        host32 = np.zeros(size + size * width, dtype=np.int32)
        host32[:n] = [s.seq_len for s in inputs.seqs]
        table = host32[size:].reshape(size, width)
        for row, s in zip(table, inputs.seqs):
            row[: len(s.block_ids)] = s.block_ids
        ids, pos, slots = self.ints64.split([B, B, B])
        src64 = copy_to_device(ints64, self.device).split([size, size, size])
        for dst, src in zip((ids, pos, slots), src64):
            dst[:size].copy_(src)
        _, seq_lens, table_buf = self.ints32.split([B, B, B * W])
        src32 = copy_to_device(torch.from_numpy(host32), self.device)
        seq_lens[:size].copy_(src32[:size])
        table_buf.view(B, W)[:size, :width].copy_(src32[size:].view(size, width))
        self.graphs[size].replay()
        self.num_replays += 1
        return self.outputs[size][:n]
