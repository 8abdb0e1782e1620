"""Execute a scheduled batch: build the flat input tensors, run the model, sample.

The runner owns no policy: it is handed a `ScheduledBatch` whose requests
already hold the blocks their new tokens go to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pdlab.models.attention import AttentionContext, SeqSlice, copy_to_device, resolve_attention_backend
from pdlab.engine.cuda_graphs import DecodeGraphs, MixedGraphs
from pdlab.models.kv_cache import KVCache
from pdlab.engine.kv_io import KVTransfers, Push
from pdlab.models.parallel import STEP
from pdlab.engine.sampler import sample_on_device
from pdlab.models.transformer import Transformer
from pdlab.policy.scheduler import ScheduledBatch, ScheduledRequest

if TYPE_CHECKING:
    from pdlab.models.parallel import TensorParallel

log = logging.getLogger("pdlab.engine")

# The KV copies a step makes as each layer is written (a prefill instance's; see pdlab/engine/kv_io.py).
PushPlan = Callable[[ScheduledBatch], list[Push]]


@dataclass
class StepInputs:
    """What every tensor-parallel rank needs to compute one step, on the host.

    Rank 0 plans it from the scheduled batch and broadcasts it as a flat list of
    ints (`encode`/`decode`): the token ids, positions and cache slots of the flat
    batch, each sequence's slice and blocks, the rows whose logits are needed, and
    the KV copies to make as each layer is written.
    """

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    seqs: list[SeqSlice]
    sample_rows: list[int]
    pushes: list[Push] = field(default_factory=list)
    # Rows whose token only the device has yet (async scheduling), with their request's id; their
    # `input_ids` are 0 here. Rank 0 only: never encoded.
    pending: list[tuple[int, str]] = field(default_factory=list)

    def encode(self) -> list[int]:
        out = [len(self.input_ids), len(self.seqs), len(self.sample_rows), len(self.pushes),
               *self.input_ids, *self.positions, *self.slots, *self.sample_rows]
        for s in self.seqs:
            out += [s.q_start, s.q_len, s.seq_len, len(s.block_ids), *s.block_ids]
        for p in self.pushes:
            rid = p.request_id.encode()
            out += [p.sender, len(rid), *rid, len(p.src_block_ids), *p.src_block_ids, *p.dst_block_ids]
        return out

    @classmethod
    def decode(cls, data: list[int]) -> StepInputs:
        T, num_seqs, num_rows, num_pushes = data[:4]
        ids, pos, slots = data[4: 4 + T], data[4 + T: 4 + 2 * T], data[4 + 2 * T: 4 + 3 * T]
        i = 4 + 3 * T
        rows = data[i: i + num_rows]
        i += num_rows
        seqs = []
        for _ in range(num_seqs):
            q_start, q_len, seq_len, n = data[i: i + 4]
            seqs.append(SeqSlice(q_start, q_len, seq_len, data[i + 4: i + 4 + n]))
            i += 4 + n
        pushes = []
        for _ in range(num_pushes):
            sender, n = data[i: i + 2]
            rid = bytes(data[i + 2: i + 2 + n]).decode()
            i += 2 + n
            n = data[i]
            pushes.append(Push(rid, sender, data[i + 1: i + 1 + n], data[i + 1 + n: i + 1 + 2 * n]))
            i += 1 + 2 * n
        return cls(ids, pos, slots, seqs, rows, pushes)


class ModelRunner:
    def __init__(self, model: Transformer, kv_cache: KVCache, attention_backend: str = "auto",
                 tp: TensorParallel | None = None) -> None:
        """`attention_backend`: "auto" (triton on CUDA, torch elsewhere), "torch" or "triton"; ConfigError otherwise.
        `tp`: this process's tensor-parallel rank (rank 0 runs `execute`, the others `serve_worker`)."""
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = model.device
        self.attention_backend = resolve_attention_backend(attention_backend, self.device)
        self.tp = tp
        self.transfers = KVTransfers(kv_cache, tp)
        self.graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None

    def capture_graphs(self, max_num_seqs: int, max_model_len: int, max_tokens: int) -> None:
        """Capture the decode CUDA graphs, then the piecewise ones of steps with prefill chunks of up to
        `max_tokens` tokens (0: none), in one memory pool (every rank at once); a kind whose capture fails
        anywhere runs eagerly."""
        decode = DecodeGraphs(self, max_num_seqs, max_model_len)
        pool = self._try_capture(decode, None, "decode")
        self.graphs = decode if pool is not None else None
        if max_tokens > 0:
            mixed = MixedGraphs(self, max_tokens)
            self.mixed_graphs = mixed if self._try_capture(mixed, pool, "piecewise") is not None else None

    def _try_capture(self, graphs: DecodeGraphs | MixedGraphs, pool, kind: str):
        """The pool after capturing `graphs` on every rank, or None (logged) where any rank failed."""
        try:
            pool = graphs.capture(pool)
            ok = 1
        except Exception as e:  # noqa: BLE001 - whatever breaks capture, eager still serves
            log.warning("%s CUDA graph capture failed (%s: %s); those steps run eagerly", kind, type(e).__name__, e)
            ok = 0
        if self.tp is not None:
            ok = self.tp.agree_min(ok)
        if not ok:
            return None
        log.info("captured %s CUDA graphs for %s %s", kind, "batch sizes" if kind == "decode" else "token counts",
                 graphs.sizes)
        return pool

    def plan(self, batch: ScheduledBatch) -> StepInputs:
        """Flatten the batch on the host: token ids, positions, cache slots, sequences, rows to sample. A
        decode of a token still being sampled (async scheduling) gets id 0 and a `pending` row."""
        bs = self.block_size
        inputs = StepInputs([], [], [], [], [])
        for item in batch.items:
            request = item.request
            end = item.start + item.num_tokens
            tokens = request.token_ids(item.start, end)
            if len(tokens) < item.num_tokens:  # the last token is on the device
                inputs.pending.append((len(inputs.input_ids) + len(tokens), request.request_id))
                tokens = [*tokens, 0]
            inputs.seqs.append(SeqSlice(len(inputs.input_ids), item.num_tokens, end, request.block_ids[: -(-end // bs)]))
            inputs.input_ids.extend(tokens)
            for p in range(item.start, end):
                inputs.positions.append(p)
                inputs.slots.append(request.block_ids[p // bs] * bs + p % bs)
            if item.sample:
                inputs.sample_rows.append(len(inputs.input_ids) - 1)
        return inputs

    def load(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionContext]:
        """The step's device tensors: (input_ids [T], positions [T], attention context)."""
        # One host-to-device copy for the int64 inputs, one (inside `build`) for the attention metadata.
        T = len(inputs.input_ids)
        flat = copy_to_device(torch.tensor(inputs.input_ids + inputs.positions + inputs.slots, dtype=torch.int64),
                              self.device)
        ids, pos, slot_mapping = flat.split([T, T, T])
        ctx = AttentionContext.build(self.kv_cache, inputs.seqs, slot_mapping, self.attention_backend)
        return ids, pos, ctx

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionContext, list[int]]:
        """(input_ids [T], positions [T], context, rows of T to sample from) of a batch."""
        inputs = self.plan(batch)
        return (*self.load(inputs), inputs.sample_rows)

    def forward(self, inputs: StepInputs, input_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run the model on one step (every rank), making the step's KV pushes as each layer is
        written; the logits of `inputs.sample_rows` [N, vocab], if any. `input_ids` [T] on the device,
        when given, replace `inputs.input_ids`."""
        on_kv_written = (lambda layer: self.transfers.push_layer(layer, inputs.pushes)) if inputs.pushes else None
        if self.graphs is not None and self.graphs.can_run(inputs):
            hidden = self.graphs.run(inputs, input_ids)  # [T, hidden]
        elif self.mixed_graphs is not None and self.mixed_graphs.can_run(inputs):
            hidden = self.mixed_graphs.run(inputs, on_kv_written, input_ids)
        else:
            ids, pos, ctx = self.load(inputs)
            ctx.on_kv_written = on_kv_written
            hidden = self.model(ids if input_ids is None else input_ids, pos, ctx)  # [T, hidden]
        rows = inputs.sample_rows
        if not rows:
            return None
        if len(rows) < hidden.shape[0] or rows[-1] != len(rows) - 1:  # else every row, in order (decode)
            hidden = hidden[rows]
        return self.model.compute_logits(hidden)  # [N, vocab]

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, push_plan: PushPlan | None = None,
               after: LaunchedStep | None = None) -> LaunchedStep:
        """Queue one step's work on the device and return without waiting for it: its sampled tokens stay
        on the device until `collect`. `push_plan(batch)`, when given, lists the KV copies to make inside
        the forward pass, each layer right after its K and V are written (a prefill instance's transfer).
        `after`: the step still computing that samples the tokens this one decodes (async scheduling; not
        with tensor parallelism, whose ranks need every id on the host)."""
        inputs = self.plan(batch)
        if push_plan is not None:
            inputs.pushes = push_plan(batch)
        if self.tp is not None:
            if inputs.pending:
                raise ValueError("with tensor parallelism a step's token ids must be known on the host")
            self.tp.broadcast_ints([STEP, *inputs.encode()])
        logits = self.forward(inputs, self._device_ids(inputs, after) if inputs.pending else None)
        to_sample = [item for item in batch.items if item.sample]
        if logits is None:
            return LaunchedStep(batch, [])
        params = [item.request.params for item in to_sample]
        # A token's output index from its position, not from the request's outputs so far: those lack the
        # tokens of steps still in flight.
        indices = [item.start + item.num_tokens - item.request.num_prompt_tokens for item in to_sample]
        tokens = sample_on_device(logits, params, [item.request.seed for item in to_sample], indices)
        results = [tokens]
        want = [r for r, p in enumerate(params) if p.logprobs is not None]
        if want:
            rows = None if len(want) == len(params) else copy_to_device(torch.tensor(want), self.device)
            k = max(1, max(params[r].logprobs for r in want))
            results += logprob_tensors(logits if rows is None else logits[rows],
                                       tokens if rows is None else tokens[rows], k)
        # To the host as soon as they are computed, ahead of whatever the device is given next (the next
        # step, with async scheduling): `collect` waits for these copies, not for that step.
        ready = None
        if self.device.type == "cuda":
            results = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                       for t in results]
            ready = torch.cuda.Event()
            ready.record()
        return LaunchedStep(batch, to_sample, tokens, results, ready)

    def _device_ids(self, inputs: StepInputs, after: LaunchedStep | None) -> torch.Tensor:
        """The step's input ids [T] on the device: the host's, with each pending row's token taken from the
        tokens `after` sampled."""
        if after is None or after.tokens is None:
            raise ValueError("a step decoding tokens not yet sampled needs the step that samples them")
        index = {item.request.request_id: r for r, item in enumerate(after.to_sample)}
        sources = [index[rid] for _, rid in inputs.pending]
        T, n = len(inputs.input_ids), len(sources)
        if n == T and sources == list(range(len(after.to_sample))):
            return after.tokens  # a decode step of the same requests, in the same order
        rows = [row for row, _ in inputs.pending]
        ids, rows_t, sources_t = copy_to_device(torch.tensor(inputs.input_ids + rows + sources), self.device).split(
            [T, n, n])
        ids[rows_t] = after.tokens[sources_t]
        return ids

    @torch.inference_mode()
    def collect(self, step: LaunchedStep) -> StepOutput:
        """Wait for a launched step's tokens (and log-probabilities, when asked) on the host."""
        out = StepOutput()
        if step.tokens is None:
            return out
        if step.ready is not None:
            step.ready.synchronize()
        tokens = step.results[0].tolist()
        out.tokens = {item.request.request_id: token for item, token in zip(step.to_sample, tokens)}
        want = [item for item in step.to_sample if item.request.params.logprobs is not None]
        if want:
            values, ids, sampled = (t.tolist() for t in step.results[1:])
            for r, item in enumerate(want):
                k = item.request.params.logprobs
                entry = dict(zip(ids[r][:k], values[r][:k]))
                entry[out.tokens[item.request.request_id]] = sampled[r]
                out.logprobs[item.request.request_id] = entry
        return out

    @torch.inference_mode()
    def serve_worker(self) -> None:
        """A tensor-parallel rank > 0: compute every step rank 0 broadcasts and run its KV transfer
        calls, until it says stop."""
        self.tp.serve(lambda data: self.forward(StepInputs.decode(data)), self.transfers.handlers)
        self.transfers.close()


@dataclass
class LaunchedStep:
    """A step queued on the device (`ModelRunner.launch`). What it samples, in the order of `to_sample`:
    `tokens` [N] on the device (where the next step may read them), and `results` on the host (the tokens,
    then, when a request asked for log-probabilities, `logprob_tensors` of those rows), valid once `ready`
    (a CUDA event; None on a CPU) has passed."""

    batch: ScheduledBatch
    to_sample: list[ScheduledRequest]
    tokens: torch.Tensor | None = None
    results: list[torch.Tensor] = field(default_factory=list)
    ready: torch.cuda.Event | None = None


@dataclass
class StepOutput:
    tokens: dict[str, int] = field(default_factory=dict)  # request id -> sampled token
    # request id -> {token id: log-probability}: the top-k and the sampled token, when asked.
    logprobs: dict[str, dict[int, float]] = field(default_factory=dict)


def logprob_tensors(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Log-probabilities of the raw model distribution (before temperature and filters) of each row:
    [top-k values [R, k], their token ids [R, k], the sampled token's [R]]."""
    logp = torch.log_softmax(logits, dim=-1)  # [R, vocab]
    top = logp.topk(k, dim=-1)
    return [top.values, top.indices, logp.gather(1, tokens[:, None]).squeeze(1)]
