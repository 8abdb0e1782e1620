"""Placement search in the manner of DistServe: which layout serves the most requests per GPU within SLO.

For a model, a GPU type, a GPU budget, a workload and TTFT/TPOT SLOs with an
attainment target, `search_placement` enumerates
- colocated layouts: n mixed instances of tensor-parallel degree t (n*t <= budget), and
- disaggregated layouts: x prefill instances of TP t_p and y decode instances
  of TP t_d (x*t_p + y*t_d <= budget),
simulates each with the roofline cost model of its own TP degree, and finds
by bisection the highest request rate whose SLO attainment reaches the
target (DistServe's goodput). Layouts rank by goodput per GPU; the first two
are the best and the runner-up.

Every rate replays the same requests with their arrival times scaled (common
random numbers), so attainment falls smoothly with the rate and two layouts
are compared on identical inputs. Pipeline parallelism, DistServe's
inter-op degree, is not searched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from pdlab.metrics.summary import meets_slo
from pdlab.models.config import ModelConfig
from pdlab.policy.scheduler import SchedulerConfig
from pdlab.sim.cluster import Layout
from pdlab.sim.cost import H100, GpuSpec, RooflineCost
from pdlab.sim.instance import InstanceSpec
from pdlab.sim.links import LINKS, LinkSpec
from pdlab.sim.run import simulate
from pdlab.workload.workload import RequestSpec


@dataclass(frozen=True)
class Candidate:
    mode: str  # "colocated" or "disaggregated"
    num_instances: int = 0  # colocated
    tp: int = 1  # colocated
    num_prefill: int = 0
    prefill_tp: int = 1
    num_decode: int = 0
    decode_tp: int = 1

    @property
    def num_gpus(self) -> int:
        if self.mode == "colocated":
            return self.num_instances * self.tp
        return self.num_prefill * self.prefill_tp + self.num_decode * self.decode_tp

    @property
    def name(self) -> str:
        if self.mode == "colocated":
            return f"{self.num_instances}x mixed TP{self.tp}"
        return f"{self.num_prefill}P(TP{self.prefill_tp})+{self.num_decode}D(TP{self.decode_tp})"


@dataclass(frozen=True)
class PlacementResult:
    candidate: Candidate
    goodput_rps: float  # the highest rate found that meets the attainment target (0 if none)
    attainment: float  # at that rate

    @property
    def per_gpu_goodput_rps(self) -> float:
        return self.goodput_rps / self.candidate.num_gpus


def candidates(num_gpus: int, tps: Sequence[int] = (1, 2, 4, 8), colocated: bool = True,
               disaggregated: bool = True) -> list[Candidate]:
    """Every layout within the budget (smaller ones too: per-GPU goodput is what ranks them)."""
    tps = [t for t in tps if t <= num_gpus]
    out = []
    if colocated:
        out += [Candidate("colocated", num_instances=n, tp=t) for t in tps for n in range(1, num_gpus // t + 1)]
    if disaggregated:
        for tp_p in tps:
            for tp_d in tps:
                for x in range(1, num_gpus // tp_p + 1):
                    for y in range(1, (num_gpus - x * tp_p) // tp_d + 1):
                        out.append(Candidate("disaggregated", num_prefill=x, prefill_tp=tp_p, num_decode=y,
                                             decode_tp=tp_d))
    return out


@dataclass(frozen=True)
class PlacementProblem:
    model: ModelConfig
    requests: Sequence[RequestSpec]  # arrivals at rate 1 req/s; each trial rescales them
    slo_ttft_s: float
    slo_tpot_s: float
    attainment_target: float = 0.9
    gpu: GpuSpec = H100
    scheduler: SchedulerConfig = field(
        default_factory=lambda: SchedulerConfig(max_num_seqs=128, max_num_batched_tokens=8192, max_model_len=8192))
    block_size: int = 16
    link: LinkSpec = LINKS["nvlink"]
    weight_bits: int = 16

    def layout(self, c: Candidate) -> Layout:
        def spec(tp: int) -> InstanceSpec:
            cost = RooflineCost(self.model, self.gpu, tp=tp, weight_bits=self.weight_bits)
            return InstanceSpec(self.scheduler, cost.max_num_blocks(self.block_size), self.block_size, cost)

        if c.mode == "colocated":
            return Layout(spec(c.tp), mode="colocated", num_instances=c.num_instances)
        return Layout(spec(c.prefill_tp), mode="disaggregated", num_prefill=c.num_prefill, num_decode=c.num_decode,
                      decode_instance=spec(c.decode_tp), link=self.link,
                      kv_bytes_per_token=self.model.kv_bytes_per_token(2), num_layers=self.model.num_layers)

    def attainment(self, c: Candidate, rate_rps: float, seed: int = 0) -> float:
        requests = [replace(r, arrival_s=r.arrival_s / rate_rps) for r in self.requests]
        records = simulate(requests, self.layout(c), cost=None, seed=seed)
        return sum(meets_slo(r, self.slo_ttft_s, self.slo_tpot_s) for r in records) / len(records)


def goodput(problem: PlacementProblem, c: Candidate, rel_tol: float = 0.02, max_rate_rps: float = 1e5) -> PlacementResult:
    """Bisection on the rate for the highest one whose attainment reaches the target."""
    low, low_attainment, high = 0.0, 0.0, 1.0
    while high < max_rate_rps:  # grow until the target fails
        a = problem.attainment(c, high)
        if a < problem.attainment_target:
            break
        low, low_attainment, high = high, a, high * 2
    while high - low > rel_tol * high:
        mid = (low + high) / 2
        a = problem.attainment(c, mid)
        if a >= problem.attainment_target:
            low, low_attainment = mid, a
        else:
            high = mid
    return PlacementResult(c, low, low_attainment)


def search_placement(problem: PlacementProblem, num_gpus: int, tps: Sequence[int] = (1, 2, 4, 8),
                     colocated: bool = True, disaggregated: bool = True) -> list[PlacementResult]:
    """All candidate layouts, best per-GPU goodput first (ties: fewer GPUs, then name)."""
    results = [goodput(problem, c) for c in candidates(num_gpus, tps, colocated, disaggregated)]
    return sorted(results, key=lambda r: (-r.per_gpu_goodput_rps, r.candidate.num_gpus, r.candidate.name))
