"""Steps replayed from CUDA graphs: whole decode steps, and the steps with prefill chunks piece by piece.

A step of a small batch is a few hundred kernel launches whose host cost
exceeds their GPU time (docs/facts.md: HF `generate` is 12x the HBM floor,
mostly launch overhead). Two kinds of graphs remove it:

`DecodeGraphs`: one graph per batch size in a set, capturing the model's whole
forward pass for B decode queries reading its inputs from static buffers:

    input_ids, positions, slot_mapping : [B]            (int64)
    seq_lens                           : [B]            (int32)
    block_table                        : [B, max_blocks] (int32; max_blocks = max_model_len / block_size)

and leaving the final hidden states [B, hidden] in a static output; the LM
head runs outside the graph on the rows that sample. A step of n <= B decodes
fills the first n rows and pads the rest: seq_len 0 (the attention kernels
write zeros for them) and the slot of the KV cache's scratch block, so that
their K and V writes land in a block no request owns.

`MixedGraphs` (piecewise): steps with prefill chunks, alone or beside decodes,
or making KV transfers. Attention is the only part of a layer whose work
depends on how the step's tokens split into sequences; everything else is
row by row over the T tokens. So for each token count T in a set, the
forward pass is captured as L + 1 graphs around the L attention calls: the
embedding and layer 0 up to attention, then each layer's rest with the next
layer up to its attention, then the last layer's rest and the final norm.
Between two graphs the step's attention runs eagerly (two kernel launches,
plus the layer's KV transfer calls) on static buffers (queries in, output
out). A step of n <= T tokens pads the rest like a decode graph does (token
0, position 0, the scratch slot); the padding rows belong to no sequence, so
attention never reads or writes them and, every other operation being row
by row, they never touch the real rows.

Graphs are captured once, largest first, in one memory pool, after the KV
cache is allocated. A step that neither kind fits runs eagerly. With tensor
parallelism every rank captures and replays the same graphs in lockstep (the
decision depends only on the step's inputs, which every rank has), NCCL
all-reduces included. If capture fails on any rank, every rank runs eagerly
and the reason is logged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from pdlab.models.attention import AttentionContext, copy_to_device

if TYPE_CHECKING:
    from pdlab.engine.model_runner import ModelRunner, StepInputs

log = logging.getLogger("pdlab.engine")

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
# Token counts of the piecewise graphs (EngineConfig.cuda_graph_max_tokens, 1024 by default, caps them). A step
# pads to the next count, and the padding rows cost the linear layers' work once a step is compute-bound (from
# ~256 tokens for an 8B model on an H100): 64 apart from there, so that a step pays at most 20% more (with 256
# apart, a 544-token step padded to 768 took 23.2 ms on an H100 against 18.7 ms eagerly). Beyond ~1k tokens a
# step's GPU time (~25 ms) exceeds an eager step's launches (~20 ms): more graphs would buy little for their memory.
DEFAULT_TOKEN_SIZES = (16, 32, 48, 64, 96, 128, 160, 192, 224, 256, *range(320, 1025, 64))
NUM_WARMUP = 2


def batch_sizes(max_num_seqs: int, sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES) -> list[int]:
    """The captured sizes: the defaults up to max_num_seqs, and max_num_seqs itself."""
    return sorted({s for s in sizes if s < max_num_seqs} | {max_num_seqs})


def token_sizes(max_tokens: int, sizes: tuple[int, ...] = DEFAULT_TOKEN_SIZES) -> list[int]:
    """The piecewise graphs' token counts up to `max_tokens`: the defaults below it, every 256 tokens beyond
    the largest default, and `max_tokens` itself."""
    more = range(sizes[-1] + 256, max_tokens, 256)
    return sorted({s for s in (*sizes, *more) if s < max_tokens} | {max_tokens})


@functools.cache
def _warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """The one side stream every capture on `device` warms up on. cuBLAS keeps a workspace (~32 MiB on an
    H100) per stream it has run on, for the life of the process: a new stream per capture cycled through
    PyTorch's pool of 32 and held 1 GiB that no engine could use, nor free on close (measured on an H100)."""
    return torch.cuda.Stream(device)


def _capture(fn: Callable[[], object], pool, device: torch.device) -> tuple[torch.cuda.CUDAGraph, object]:
    """`fn` warmed up on a side stream, then captured into a graph sharing `pool`: (graph, its output)."""
    stream = _warmup_stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(NUM_WARMUP):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = fn()
    return graph, output


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
    def capture(self, pool=None):
        """Capture every size (all ranks at once with tensor parallelism) into `pool` (a new one if None);
        returns the pool. Raises on failure."""
        B = self.max_batch
        ids, pos, slots = self.ints64.split([B, B, B])
        slots.fill_(self.scratch_slot)  # capture-time writes land in the scratch block too
        model = self.runner.model
        for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its pool
            ctx = self._context(size)
            graph, self.outputs[size] = _capture(lambda: model(ids[:size], pos[:size], ctx), pool, self.device)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)
        return pool

    # --- replay --------------------------------------------------------------------------------------

    def can_run(self, inputs: StepInputs) -> bool:
        n = len(inputs.seqs)
        return (0 < n <= self.max_batch and not inputs.pushes and len(inputs.input_ids) == n
                and all(len(s.block_ids) <= self.max_blocks for s in inputs.seqs))

    def run(self, inputs: StepInputs, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden states [n, hidden] of a decode-only step of n sequences (`can_run` first);
        `input_ids` [n] on the device replace `inputs.input_ids`."""
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
        if input_ids is not None:
            ids[:n].copy_(input_ids)
        self.graphs[size].replay()
        self.num_replays += 1
        return self.outputs[size][:n]


class MixedGraphs:
    """Piecewise graphs of every step up to the largest token count (see the module docstring)."""

    def __init__(self, runner: ModelRunner, max_tokens: int) -> None:
        model = runner.model
        c = model.local_config
        self.runner = runner
        self.device = runner.device
        self.sizes = token_sizes(max_tokens)
        self.max_tokens = T = self.sizes[-1]
        self.scratch_slot = runner.kv_cache.scratch_slot
        if self.scratch_slot is None:
            raise ValueError("CUDA graphs need a KV cache with a scratch block for the padding rows")
        e = dict(dtype=model.dtype, device=self.device)
        self.ints64 = torch.zeros(3 * T, dtype=torch.int64, device=self.device)  # ids, positions, slots
        self.x = torch.zeros(T, c.hidden_size, **e)  # the residual stream between two graphs
        self.q = torch.zeros(T, c.num_heads, c.head_dim, **e)  # attention's queries ...
        self.attn = torch.zeros(T, c.num_heads, c.head_dim, **e)  # ... and its output (padding rows: stale, finite)
        self.cos = torch.zeros(T, c.head_dim // 2, dtype=torch.float32, device=self.device)
        self.sin = torch.zeros_like(self.cos)
        self.hidden = torch.zeros(T, c.hidden_size, **e)  # the final norm's output
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.num_replays = 0

    def pieces(self, size: int) -> list[Callable[[], None]]:
        """The L + 1 pieces of a forward pass over `size` tokens, each reading and writing the static
        buffers only; attention of layer l runs between pieces l and l + 1."""
        model = self.runner.model
        layers = model.layers
        T = self.max_tokens
        ids, pos, slots = (t[:size] for t in self.ints64.split([T, T, T]))
        x, q, attn, cos, sin = self.x[:size], self.q[:size], self.attn[:size], self.cos[:size], self.sin[:size]
        # The layers read of a context, up to and after attention, only its backend, cache and slots.
        ctx = AttentionContext.build(self.runner.kv_cache, [], slots, self.runner.attention_backend)

        def first() -> None:
            c, s = model.rope(pos)
            cos.copy_(c)
            sin.copy_(s)
            x.copy_(model.embed(ids))
            q.copy_(layers[0].pre(x, cos, sin, ctx))

        def between(i: int) -> Callable[[], None]:
            def piece() -> None:  # the rest of layer i - 1, then layer i up to attention
                x.copy_(layers[i - 1].post(x, attn, ctx))
                q.copy_(layers[i].pre(x, cos, sin, ctx))
            return piece

        def last() -> None:
            self.hidden[:size].copy_(model.final_norm(layers[-1].post(x, attn, ctx), ctx))

        return [first, *(between(i) for i in range(1, len(layers))), last]

    @torch.inference_mode()
    def capture(self, pool=None):
        """Capture every token count, largest first, into `pool` (a new one if None); returns the pool."""
        T = self.max_tokens
        self.ints64.split([T, T, T])[2].fill_(self.scratch_slot)
        for size in reversed(self.sizes):
            graphs = []
            for piece in self.pieces(size):
                graph, _ = _capture(piece, pool, self.device)
                pool = graph.pool()
                graphs.append(graph)
            self.graphs[size] = graphs
        torch.cuda.synchronize(self.device)
        return pool

    def can_run(self, inputs: StepInputs) -> bool:
        return 0 < len(inputs.input_ids) <= self.max_tokens

    def run(self, inputs: StepInputs, on_kv_written: Callable[[int], None] | None = None,
            input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden states [n, hidden] of a step of n tokens (`can_run` first). `on_kv_written(layer)`
        runs as each layer's new K and V are in the cache (a prefill instance's transfer); `input_ids` [n]
        on the device replace `inputs.input_ids`."""
        n = len(inputs.input_ids)
        size = next(s for s in self.sizes if s >= n)
        pad = size - n
        T = self.max_tokens
        host = torch.tensor([*inputs.input_ids, *[0] * pad, *inputs.positions, *[0] * pad,
                             *inputs.slots, *[self.scratch_slot] * pad], dtype=torch.int64)
        ids, pos, slots = self.ints64.split([T, T, T])
        for dst, src in zip((ids, pos, slots), copy_to_device(host, self.device).split([size, size, size])):
            dst[:size].copy_(src)
        if input_ids is not None:
            ids[:n].copy_(input_ids)
        ctx = AttentionContext.build(self.runner.kv_cache, inputs.seqs, slots[:size], self.runner.attention_backend)
        ctx.on_kv_written = on_kv_written
        graphs = self.graphs[size]
        graphs[0].replay()
        for layer, graph in enumerate(graphs[1:]):
            ctx.attend(layer, self.q[:size], out=self.attn[:size])
            graph.replay()
        self.num_replays += 1
        return self.hidden[:n]
