"""How long one scheduled batch takes on a simulated instance.

Every cost model answers one question, `step_time_s(batch)`, for the batch the
shared scheduler just returned. Two live here:

- `FixedCost`: the same time for every step, whatever is in it (queueing tests).
- `RooflineCost`: an analytical model of a dense decoder on a `GpuSpec`. A step
  costs max(FLOPs / (peak * compute_efficiency), bytes / (bandwidth *
  bandwidth_efficiency)) + step_overhead_s, plus, with tensor parallelism, two
  all-reduces per layer (after attention and after the MLP).

FLOPs of a step, for an item computing positions [start, start + n):
  2 * linear_params * n                      (every linear layer, every token)
  2 * vocab * hidden                         (the LM head, only when it samples)
  4 * layers * q_size * (n*start + n(n+1)/2) (QK^T and PV over the causal context)
Bytes of a step:
  weights read once (the input embedding table is gathered, not read whole)
  + the KV of every item's context read once + the KV of its new tokens written.
Activations are left out: they are small next to weights and KV at these sizes.

Mixture-of-experts (`MoeSpec`): from `num_dense_layers` on, each layer's MLP
is `num_experts` experts of `expert_intermediate_size` (plus shared experts
every token uses). FLOPs count the `experts_per_token` experts each token
uses; bytes count the experts the step touches, E * (1 - (1 - k/E)^T) for T
tokens under uniform routing, so decode at batch 1 reads k experts and a large
prefill reads all of them. Experts are split across TP ranks like dense
weights; expert parallelism (all-to-all) is not modelled.

Standard library only, like the policy code it times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

from pdlab.models.config import ModelConfig
from pdlab.policy.scheduler import ScheduledBatch
from pdlab.sim.profile_cost import interpolate


class CostModel(Protocol):
    def step_time_s(self, batch: ScheduledBatch) -> float:
        """Seconds the step that computes `batch` takes, from launch to sampled tokens.

        Called once per non-empty batch, after `Scheduler.schedule` and before
        `Scheduler.update`; it must not change the batch or its requests. The
        result is > 0 and depends only on the batch (no hidden state), so a run
        is deterministic.
        """
        ...


@dataclass(frozen=True)
class FixedCost:
    """Every step takes `step_s`, whatever it holds."""

    step_s: float

    def __post_init__(self) -> None:
        if not self.step_s > 0:
            raise ValueError(f"step_s must be > 0, got {self.step_s}")

    def step_time_s(self, batch: ScheduledBatch) -> float:
        return self.step_s


def parse_overhead_ms(text: str) -> float | dict[int, float]:
    """A served overhead on a command line: one figure of ms ("3.6"), or a table of batch:ms ("1:0,16:3.2").
    ValueError naming the text otherwise."""
    try:
        if ":" not in text:
            return float(text)
        return {int(n): float(ms) for n, ms in (part.split(":") for part in text.split(",") if part)}
    except ValueError:
        raise ValueError(f"a served overhead is ms (3.6) or batch:ms pairs (1:0,16:3.2), not {text!r}") from None


def format_overhead_ms(ms: float | dict[int, float]) -> str:
    """The inverse of parse_overhead_ms."""
    return f"{ms:g}" if isinstance(ms, (int, float)) else ",".join(f"{n}:{v:.2f}" for n, v in sorted(ms.items()))


def overhead_seconds(ms: float | dict[int, float]) -> float | tuple[tuple[int, float], ...]:
    """`ServedCost.overhead_s` from milliseconds: one figure, or {batch: ms}. ValueError for a negative
    figure or a batch below 1."""
    if isinstance(ms, (int, float)):
        if ms < 0:
            raise ValueError(f"a served overhead must be >= 0 ms, got {ms}")
        return ms / 1e3
    if not ms or any(n < 1 or v < 0 for n, v in ms.items()):
        raise ValueError(f"a served overhead table needs batches >= 1 and ms >= 0, got {ms}")
    return tuple((n, v / 1e3) for n, v in sorted(ms.items()))


@dataclass(frozen=True)
class ServedCost:
    """`engine`'s step plus what a served instance adds to every step beyond the engine's own (its loop,
    scheduling, output messages), spent on the host. `overhead_s` is one figure for every step, or a table of
    (sequences in the step, seconds) interpolated linearly in between and held beyond its ends: what
    `pdlab.metrics.served.served_overhead_ms` measures from a real run's token intervals against the profile."""

    engine: CostModel
    overhead_s: float | tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:
        table = ((1, self.overhead_s),) if isinstance(self.overhead_s, (int, float)) else tuple(self.overhead_s)
        if not table or any(n < 1 or not s >= 0 for n, s in table) or len({n for n, _ in table}) < len(table):
            raise ValueError(f"overhead_s must be >= 0 seconds, for distinct step sizes >= 1; got {self.overhead_s}")
        sizes, seconds = zip(*sorted(table))
        object.__setattr__(self, "_sizes", sizes)
        object.__setattr__(self, "_seconds", seconds)

    def step_time_s(self, batch: ScheduledBatch) -> float:
        return self.engine.step_time_s(batch) + self.host_time_s(batch)

    def host_time_s(self, batch: ScheduledBatch) -> float:
        """The part of `step_time_s` spent on the host, when the GPU is free for other instances."""
        sizes = self._sizes
        return interpolate(sizes, self._seconds, min(max(len(batch.items), sizes[0]), sizes[-1]))

    def __getattr__(self, name: str):  # what else the engine's model offers (its memory sizes)
        if name == "engine":
            raise AttributeError(name)
        return getattr(self.engine, name)


@dataclass(frozen=True)
class GpuSpec:
    name: str
    peak_flops: float  # dense bf16 matmul, FLOP/s
    mem_bandwidth_bytes_per_s: float  # HBM, as a device-to-device copy measures it
    link_bandwidth_bytes_per_s: float  # GPU to GPU inside the node (tensor parallel all-reduce)
    link_latency_s: float  # per collective call
    mem_bytes: int


# Measured on this project's H100 80GB HBM3 (docs/facts.md, data/bench/engine_speed.json):
# 8192^3 bf16 matmul 783-803 TFLOP/s, device copy 3.0 TB/s, peer copy ~390 GB/s.
H100 = GpuSpec("h100", peak_flops=790e12, mem_bandwidth_bytes_per_s=3.0e12,
               link_bandwidth_bytes_per_s=390e9, link_latency_s=10e-6, mem_bytes=80 << 30)
GPUS = {"h100": H100}


@dataclass(frozen=True)
class MoeSpec:
    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    num_shared_experts: int = 0
    num_dense_layers: int = 0  # the first layers keep a dense MLP of the model's intermediate_size

    def __post_init__(self) -> None:
        if not 0 < self.experts_per_token <= self.num_experts:
            raise ValueError(f"need 0 < experts_per_token <= num_experts, got {self}")


@dataclass(frozen=True)
class RooflineCost:
    """Analytical step time of a dense or MoE transformer; see the module docstring for the formulas.

    The efficiencies are fitted knobs, not physics. Defaults:
    - `compute_efficiency` 0.65: the prefill MFU target of docs/facts.md (a tuned
      engine reaches 60-70% of measured matmul peak on long prompts);
    - `bandwidth_efficiency` 0.72: cuBLAS bf16 linears of llama3-8b at M <= 64
      reach 72% of copy bandwidth (docs/facts.md);
    - `step_overhead_s` 1 ms: scheduling, sampling and launches with CUDA graphs;
    - `allreduce_efficiency` 0.8 of the link bandwidth for the ring's transfers.
    Fit them to step times measured on the target engine (`pdlab.sim.fit.fit_roofline`
    over a `python -m pdlab.profiler` table), or use that table itself (`ProfileCost`).
    """

    model: ModelConfig
    gpu: GpuSpec = H100
    tp: int = 1
    weight_bits: int = 16
    kv_bytes: int = 2  # bytes per KV element (bf16)
    activation_bytes: int = 2  # bytes per all-reduced element
    compute_efficiency: float = 0.65
    bandwidth_efficiency: float = 0.72
    allreduce_efficiency: float = 0.8
    step_overhead_s: float = 1e-3
    moe: MoeSpec | None = None

    def __post_init__(self) -> None:
        if self.tp < 1 or (self.model.num_kv_heads % self.tp and self.tp % self.model.num_kv_heads):
            raise ValueError(f"tp={self.tp} does not divide the model's {self.model.num_kv_heads} KV heads")
        for name in ("compute_efficiency", "bandwidth_efficiency", "allreduce_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")

    # --- per-model constants (cached: the dataclass is frozen) -------------------------

    @property
    def num_moe_layers(self) -> int:
        return 0 if self.moe is None else self.model.num_layers - self.moe.num_dense_layers

    @property
    def expert_params(self) -> int:
        return 0 if self.moe is None else 3 * self.model.hidden_size * self.moe.expert_intermediate_size

    @cached_property
    def linear_params(self) -> int:
        """Parameters of the layers' linear maps that every token multiplies (active experts only)."""
        m = self.model
        attention = m.hidden_size * (m.q_size + 2 * m.kv_size) + m.q_size * m.hidden_size
        dense_mlp = 3 * m.hidden_size * m.intermediate_size
        total = m.num_layers * attention + (m.num_layers - self.num_moe_layers) * dense_mlp
        if self.moe is not None:
            per_token = self.moe.experts_per_token + self.moe.num_shared_experts
            total += self.num_moe_layers * (per_token * self.expert_params + m.hidden_size * self.moe.num_experts)
        return total

    @cached_property
    def total_params(self) -> int:
        """Every parameter of the model: all experts, the embedding table, the LM head unless tied."""
        return round(self.model.num_params() + self._moe_params(None))

    @cached_property
    def active_params(self) -> int:
        """The parameters one token uses: the total less the experts it is not routed to (MoE's "A47B")."""
        return round(self.model.num_params() + self._moe_params(1))

    @cached_property
    def weight_bytes_read(self) -> float:
        """Weight bytes a one-token step reads on one GPU: every parameter but the embedding gather."""
        return self.weight_bytes_for(1)

    def weight_bytes_for(self, num_tokens: int) -> float:
        """Weight bytes a step of `num_tokens` tokens reads on one GPU (MoE: only the experts it touches)."""
        m = self.model
        params = m.num_params() - (0 if m.tie_word_embeddings else m.vocab_size * m.hidden_size)
        return (params + self._moe_params(num_tokens)) * self.weight_bits / 8 / self.tp

    @cached_property
    def weight_bytes_stored(self) -> float:
        """Weight bytes one GPU holds (every expert, the embedding table too)."""
        return (self.model.num_params() + self._moe_params(None)) * self.weight_bits / 8 / self.tp

    def _moe_params(self, num_tokens: int | None) -> float:
        """MoE layers' parameters (experts touched by `num_tokens`; None: all) less the dense MLPs counted by the model."""
        if self.moe is None:
            return 0.0
        m, e = self.model, self.moe.num_experts
        touched = e if num_tokens is None else e * (1 - (1 - self.moe.experts_per_token / e) ** max(num_tokens, 1))
        return self.num_moe_layers * ((touched + self.moe.num_shared_experts) * self.expert_params
                                      + m.hidden_size * e - 3 * m.hidden_size * m.intermediate_size)

    @cached_property
    def kv_bytes_per_token(self) -> float:
        """KV bytes of one token position on one GPU (KV heads are split across TP ranks)."""
        return self.model.kv_bytes_per_token(self.kv_bytes) / min(self.tp, self.model.num_kv_heads)

    # --- the step ----------------------------------------------------------------------

    def step_time_s(self, batch: ScheduledBatch) -> float:
        flops, bytes_, num_tokens = self.step_work(batch)
        compute_s = flops / (self.gpu.peak_flops * self.compute_efficiency)
        memory_s = bytes_ / (self.gpu.mem_bandwidth_bytes_per_s * self.bandwidth_efficiency)
        return max(compute_s, memory_s) + self.step_overhead_s + self.allreduce_s(num_tokens)

    def step_work(self, batch: ScheduledBatch) -> tuple[float, float, int]:
        """(FLOPs, bytes moved, tokens) of the step on one GPU: what the efficiencies divide (`fit.py` fits them)."""
        m = self.model
        num_tokens = num_sampled = pairs = context = 0
        for item in batch.items:
            n, start = item.num_tokens, item.start
            num_tokens += n
            num_sampled += item.sample
            pairs += n * start + n * (n + 1) // 2
            context += start + n
        flops = (2 * self.linear_params * num_tokens + 2 * m.vocab_size * m.hidden_size * num_sampled
                 + 4 * m.num_layers * m.q_size * pairs) / self.tp
        weights = self.weight_bytes_read if self.moe is None else self.weight_bytes_for(num_tokens)
        return flops, weights + self.kv_bytes_per_token * (context + num_tokens), num_tokens

    def allreduce_s(self, num_tokens: int) -> float:
        """Two ring all-reduces per layer of a [num_tokens, hidden] activation; 0 without TP."""
        if self.tp == 1:
            return 0.0
        size = num_tokens * self.model.hidden_size * self.activation_bytes
        one = (2 * (self.tp - 1) / self.tp * size / (self.gpu.link_bandwidth_bytes_per_s * self.allreduce_efficiency)
               + self.gpu.link_latency_s)
        return 2 * self.model.num_layers * one

    def max_num_blocks(self, block_size: int, memory_utilization: float = 0.9, reserve_bytes: int = 2 << 30) -> int:
        """KV blocks that fit one GPU next to its weight shard (what the engine would allocate)."""
        free = self.gpu.mem_bytes * memory_utilization - self.weight_bytes_stored - reserve_bytes
        return max(0, math.floor(free / (self.kv_bytes_per_token * block_size)))
