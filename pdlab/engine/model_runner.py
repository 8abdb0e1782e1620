"""Execute a scheduled batch: build the flat input tensors, run the model, sample.

The runner owns no policy: it is handed a `ScheduledBatch` whose requests
already hold the blocks their new tokens go to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pdlab.engine.attention import AttentionContext, SeqSlice, copy_to_device, resolve_attention_backend
from pdlab.engine.kv_cache import KVCache
from pdlab.engine.sampler import sample
from pdlab.models.transformer import Transformer
from pdlab.policy.scheduler import ScheduledBatch

# Called as hook(layer_idx, batch) once the layer's new K and V are in the cache.
KVWrittenHook = Callable[[int, ScheduledBatch], None]


class ModelRunner:
    def __init__(self, model: Transformer, kv_cache: KVCache, attention_backend: str = "auto") -> None:
        """`attention_backend`: "auto" (triton on CUDA, torch elsewhere), "torch" or "triton"; ConfigError otherwise."""
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = model.device
        self.attention_backend = resolve_attention_backend(attention_backend, self.device)

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionContext, list[int]]:
        """Flatten the batch: (input_ids [T], positions [T], context, rows of T to sample from)."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seqs: list[SeqSlice] = []
        sample_rows: list[int] = []
        for item in batch.items:
            request = item.request
            end = item.start + item.num_tokens
            prompt_len = request.num_prompt_tokens
            if end <= prompt_len:
                tokens = request.prompt_token_ids[item.start:end]
            else:
                tokens = request.all_token_ids[item.start:end]
            seqs.append(SeqSlice(len(input_ids), item.num_tokens, end, request.block_ids[: -(-end // bs)]))
            input_ids.extend(tokens)
            for p in range(item.start, end):
                positions.append(p)
                slots.append(request.block_ids[p // bs] * bs + p % bs)
            if item.sample:
                sample_rows.append(len(input_ids) - 1)

        # One host-to-device copy for the int64 inputs, one (inside `build`) for the attention metadata.
        T = len(input_ids)
        flat = copy_to_device(torch.tensor(input_ids + positions + slots, dtype=torch.int64), self.device)
        ids, pos, slot_mapping = flat.split([T, T, T])
        ctx = AttentionContext.build(self.kv_cache, seqs, slot_mapping, self.attention_backend)
        return ids, pos, ctx, sample_rows

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, on_kv_written: KVWrittenHook | None = None) -> StepOutput:
        """Run one step; return the new token of every item with `sample=True`, by request id."""
        out = StepOutput()
        if not batch.items:
            return out
        ids, pos, ctx, sample_rows = self.prepare(batch)
        if on_kv_written is not None:
            ctx.on_kv_written = lambda layer: on_kv_written(layer, batch)
        hidden = self.model(ids, pos, ctx)  # [T, hidden]
        to_sample = [item for item in batch.items if item.sample]
        if not to_sample:
            return out
        logits = self.model.compute_logits(hidden[sample_rows])  # [N, vocab]
        params = [item.request.params for item in to_sample]
        tokens = sample(
            logits,
            params,
            [item.request.seed for item in to_sample],
            [item.request.num_output_tokens for item in to_sample],
        )
        out.tokens = {item.request.request_id: token for item, token in zip(to_sample, tokens)}
        want = [r for r, p in enumerate(params) if p.logprobs is not None]
        if want:
            out.logprobs = top_logprobs(logits[want], [params[r].logprobs for r in want],
                                        [tokens[r] for r in want], [to_sample[r].request.request_id for r in want])
        return out


@dataclass
class StepOutput:
    tokens: dict[str, int] = field(default_factory=dict)  # request id -> sampled token
    # request id -> {token id: log-probability}: the top-k and the sampled token, when asked.
    logprobs: dict[str, dict[int, float]] = field(default_factory=dict)


def top_logprobs(logits: torch.Tensor, ks: list[int], tokens: list[int], ids: list[str]) -> dict[str, dict[int, float]]:
    """Log-probabilities of the raw model distribution (before temperature and filters)."""
    logp = torch.log_softmax(logits, dim=-1)  # [R, vocab]
    top = logp.topk(max(max(ks), 1), dim=-1)
    result = {}
    for r, (k, token, rid) in enumerate(zip(ks, tokens, ids)):
        entry = {int(t): float(v) for t, v in zip(top.indices[r, :k].tolist(), top.values[r, :k].tolist())}
        entry[token] = float(logp[r, token])
        result[rid] = entry
    return result
