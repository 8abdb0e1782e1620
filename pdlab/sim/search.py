"""Placement search in the manner of DistServe: which layout serves the most requests per GPU within SLO.

For a model, a GPU type, a GPU budget, a workload and TTFT/TPOT SLOs with an
attainment target, `search_placement` enumerates
- colocated layouts: n mixed instances of tensor-parallel degree t (n*t <= budget), and
- disaggregated layouts: x prefill instances of TP t_p and y decode instances
  of TP t_d (x*t_p + y*t_d <= budget),
- and, when asked, a prefill and a decode instance sharing ONE GPU, time-sliced
  or under CUDA MPS with an SM split (`shared_gpu_pairs`),
simulates each with the roofline cost model of its own TP degree, and finds
by bisection the highest request rate whose SLO attainment reaches the
target (DistServe's goodput). Layouts rank by goodput per GPU; the first two
are the best and the runner-up.

Every rate replays the same requests with their arrival times scaled (common
random numbers), so attainment falls smoothly with the rate and two layouts
are compared on identical inputs. A layout whose weights leave no room for
one `max_model_len` request's KV on a GPU, or that misses the target even at
`min_rate_rps`, has goodput 0. Pipeline parallelism, DistServe's inter-op
degree, is not searched. `python -m pdlab.placement` runs the search from the
command line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace

from pdlab.metrics.summary import meets_slo
from pdlab.models.config import ModelConfig
from pdlab.policy.devices import gpus_of
from pdlab.policy.scheduler import SchedulerConfig
from pdlab.sim.cluster import Layout
from pdlab.sim.cost import H100, CostModel, GpuSpec, MoeSpec, RooflineCost, ServedCost
from pdlab.sim.instance import InstanceSpec
from pdlab.sim.links import LINKS, LinkSpec
from pdlab.sim.simulation import simulate
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
    # A prefill and a decode instance on ONE GPU: "time" (time-sliced) or "mps" with SM limits (percent) per
    # role; "" for instances on GPUs of their own.
    gpu_sharing: str = ""
    sm_percentage: tuple[int, int] = (100, 100)  # mps: (prefill, decode)

    @property
    def num_gpus(self) -> int:
        if self.gpu_sharing:
            return 1
        if self.mode == "colocated":
            return self.num_instances * self.tp
        return self.num_prefill * self.prefill_tp + self.num_decode * self.decode_tp

    @property
    def name(self) -> str:
        if self.gpu_sharing == "time":
            return "1P+1D on 1 GPU, time-sliced"
        if self.gpu_sharing == "mps":
            return f"1P+1D on 1 GPU, MPS {self.sm_percentage[0]}/{self.sm_percentage[1]}"
        if self.mode == "colocated":
            return f"{self.num_instances}x mixed TP{self.tp}"
        return f"{self.num_prefill}P(TP{self.prefill_tp})+{self.num_decode}D(TP{self.decode_tp})"


def candidate_of_run(run, num_gpus: int) -> Candidate:
    """The candidate an experiment file's run (`pdlab.experiment.RunSection`) is, on a machine of `num_gpus`
    GPUs: to put the search's answer beside a real sweep's."""
    tp = run.tensor_parallel_size or 1
    if run.mode == "colocated":
        return Candidate("colocated", num_instances=run.num_instances, tp=tp)
    prefill_tp, decode_tp = run.prefill_tp or 1, run.decode_tp or 1
    placed = gpus_of([prefill_tp] * run.num_prefill + [decode_tp] * run.num_decode, num_gpus)
    if sum(map(len, placed)) > len({gpu for ids in placed for gpu in ids}):  # they share GPUs
        sm = (run.sm_percentage.get("prefill", 100), run.sm_percentage.get("decode", 100))
        return Candidate("disaggregated", num_prefill=1, num_decode=1, gpu_sharing=run.gpu_sharing,
                         sm_percentage=sm if run.gpu_sharing == "mps" else (100, 100))
    return Candidate("disaggregated", num_prefill=run.num_prefill, prefill_tp=prefill_tp, num_decode=run.num_decode,
                     decode_tp=decode_tp)


def shared_gpu_pairs(specs: Sequence[str]) -> list[Candidate]:
    """One-GPU pairs from specs such as "time", "mps:100/100", "mps:60/40" (SM percent of prefill/decode)."""
    out = []
    for spec in specs:
        kind, _, split = spec.strip().partition(":")
        if kind == "time" and not split:
            out.append(Candidate("disaggregated", num_prefill=1, num_decode=1, gpu_sharing="time"))
            continue
        try:
            prefill, decode = (int(x) for x in split.split("/"))
        except ValueError:
            prefill = decode = 0
        if kind != "mps" or not (1 <= prefill <= 100 and 1 <= decode <= 100):
            raise ValueError(f"a one-GPU pair is 'time' or 'mps:P/D' with SM percentages 1-100, got {spec!r}")
        out.append(Candidate("disaggregated", num_prefill=1, num_decode=1, gpu_sharing="mps",
                             sm_percentage=(prefill, decode)))
    return out


@dataclass(frozen=True)
class PlacementResult:
    candidate: Candidate
    goodput_rps: float  # the highest rate found that meets the attainment target (0 if none)
    attainment: float  # at that rate (goodput 0: at the lowest rate tried)
    infeasible: str | None = None  # why the layout cannot serve at all (then goodput 0, nothing simulated)

    @property
    def per_gpu_goodput_rps(self) -> float:
        return self.goodput_rps / self.candidate.num_gpus


def candidates(num_gpus: int, tps: Sequence[int] = (1, 2, 4, 8), colocated: bool = True,
               disaggregated: bool = True, prefill_tps: Sequence[int] | None = None,
               decode_tps: Sequence[int] | None = None) -> list[Candidate]:
    """Every layout within the budget (smaller ones too: per-GPU goodput is what ranks them).

    `tps` are the colocated instances' TP degrees and, unless `prefill_tps` or
    `decode_tps` say otherwise, those of each phase.
    """
    def fit(choices: Sequence[int] | None) -> list[int]:
        return sorted({t for t in (tps if choices is None else choices) if t <= num_gpus})

    out = []
    if colocated:
        out += [Candidate("colocated", num_instances=n, tp=t) for t in fit(tps) for n in range(1, num_gpus // t + 1)]
    if disaggregated:
        for tp_p in fit(prefill_tps):
            for tp_d in fit(decode_tps):
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
    moe: MoeSpec | None = None
    routing: str = "innode"  # pdlab.sim.cluster.Layout.routing
    # Step times of TP-1 instances from a measured table instead of the roofline (memory still from the roofline),
    # plus a served instance's per-step overhead; how concurrent steps share a GPU under MPS (pdlab/sim/gpus.py).
    profile: CostModel | None = None
    step_overhead_s: float | tuple[tuple[int, float], ...] = 0.0  # pdlab.sim.cost.ServedCost.overhead_s
    mps_capacity: float = 1.0
    pair_memory_share: tuple[float, float] = (0.35, 0.55)  # a one-GPU pair's shares of the card (prefill, decode)

    def roofline(self, tp: int) -> RooflineCost:
        return RooflineCost(self.model, self.gpu, tp=tp, weight_bits=self.weight_bits, moe=self.moe)

    def cost(self, tp: int) -> CostModel:
        base = self.profile if self.profile is not None and tp == 1 else self.roofline(tp)
        return ServedCost(base, self.step_overhead_s) if self.step_overhead_s else base

    def layout(self, c: Candidate) -> Layout:
        def spec(tp: int, blocks: int | None = None) -> InstanceSpec:
            blocks = self.roofline(tp).max_num_blocks(self.block_size) if blocks is None else blocks
            return InstanceSpec(self.scheduler, blocks, self.block_size, self.cost(tp))

        if c.gpu_sharing:  # one GPU: the prefill's share holds the weights, the decode maps them
            roofline = self.roofline(1)
            prefill = roofline.max_num_blocks(self.block_size, self.pair_memory_share[0])
            decode = roofline.max_num_blocks(self.block_size, self.pair_memory_share[1]) + \
                int(roofline.weight_bytes_stored // (roofline.kv_bytes_per_token * self.block_size))
            return Layout(spec(1, prefill), mode="disaggregated", decode_instance=spec(1, decode), link=LINKS["ideal"],
                          routing=self.routing, kv_bytes_per_token=self.model.kv_bytes_per_token(2),
                          num_layers=self.model.num_layers, gpu_of=(0, 0), gpu_sharing=c.gpu_sharing,
                          sm_share=(c.sm_percentage[0] / 100, c.sm_percentage[1] / 100), mps_capacity=self.mps_capacity)
        if c.mode == "colocated":
            return Layout(spec(c.tp), mode="colocated", num_instances=c.num_instances, routing=self.routing)
        return Layout(spec(c.prefill_tp), mode="disaggregated", num_prefill=c.num_prefill, num_decode=c.num_decode,
                      decode_instance=spec(c.decode_tp), link=self.link, routing=self.routing,
                      kv_bytes_per_token=self.model.kv_bytes_per_token(2), num_layers=self.model.num_layers)

    def infeasible(self, c: Candidate) -> str | None:
        """Why `c` cannot serve a request of `max_model_len` tokens at all (None: it can)."""
        tps = (c.tp,) if c.mode == "colocated" else (c.prefill_tp, c.decode_tp)
        for tp in sorted(set(tps)):
            share = self.pair_memory_share[0] if c.gpu_sharing else 0.9
            room = self.roofline(tp).max_num_blocks(self.block_size, share) * self.block_size
            if room < self.scheduler.max_model_len:
                return (f"at TP{tp} the weights leave room for {room} KV tokens per GPU, fewer than max_model_len "
                        f"({self.scheduler.max_model_len})")
        return None

    def attainment(self, c: Candidate, rate_rps: float, seed: int = 0) -> float:
        requests = [replace(r, arrival_s=r.arrival_s / rate_rps) for r in self.requests]
        records = simulate(requests, self.layout(c), cost=None, seed=seed)
        return sum(meets_slo(r, self.slo_ttft_s, self.slo_tpot_s) for r in records) / len(records)


def goodput(problem: PlacementProblem, c: Candidate, rel_tol: float = 0.02, max_rate_rps: float = 1e5,
            min_rate_rps: float = 1e-3, start_rps: float = 1.0) -> PlacementResult:
    """The highest rate whose attainment reaches the target: doubling or halving from `start_rps`, then bisection.

    A good `start_rps` (near the answer) saves the doubling trials; the answer
    is the same to within `rel_tol` wherever attainment falls with the rate.
    """
    why = problem.infeasible(c)
    if why is not None:
        return PlacementResult(c, 0.0, 0.0, why)
    target = problem.attainment_target
    rate = min(max(start_rps, min_rate_rps), max_rate_rps)
    a = problem.attainment(c, rate)
    if a >= target:
        low, low_attainment = rate, a
        while True:  # grow until the target fails
            rate *= 2
            if rate > max_rate_rps:
                return PlacementResult(c, low, low_attainment)
            a = problem.attainment(c, rate)
            if a < target:
                high = rate
                break
            low, low_attainment = rate, a
    else:
        high = rate
        while True:  # shrink until the target holds
            rate /= 2
            if rate < min_rate_rps:
                return PlacementResult(c, 0.0, a)
            a = problem.attainment(c, rate)
            if a >= target:
                low, low_attainment = rate, a
                break
            high = rate
    while high - low > rel_tol * high:
        mid = (low + high) / 2
        a = problem.attainment(c, mid)
        if a >= target:
            low, low_attainment = mid, a
        else:
            high = mid
    return PlacementResult(c, low, low_attainment)


def rank(results: Sequence[PlacementResult]) -> list[PlacementResult]:
    """Best per-GPU goodput first (ties: fewer GPUs, then name)."""
    return sorted(results, key=lambda r: (-r.per_gpu_goodput_rps, r.candidate.num_gpus, r.candidate.name))


def evaluate(problem: PlacementProblem, found: Sequence[Candidate], jobs: int = 1,
             on_result: Callable[[PlacementResult], None] | None = None) -> list[PlacementResult]:
    """`goodput` of every candidate, in their order, on up to `jobs` processes.

    The first feasible candidate is searched from 1 req/s; its goodput per GPU,
    times each other candidate's GPU count, is where the others start (most
    layouts of one model land within a factor of a few of each other, so this
    saves most of the doubling trials). The starts do not depend on `jobs`, so
    neither do the results.
    """
    results: list[PlacementResult | None] = [None] * len(found)
    first = next((i for i, c in enumerate(found) if problem.infeasible(c) is None), None)
    per_gpu = 0.0
    if first is not None:
        results[first] = goodput(problem, found[first])
        per_gpu = results[first].per_gpu_goodput_rps
        if on_result is not None:
            on_result(results[first])
    rest = [(i, c, per_gpu * c.num_gpus if per_gpu > 0 else 1.0) for i, c in enumerate(found) if i != first]
    if jobs > 1 and len(rest) > 1:
        with ProcessPoolExecutor(min(jobs, len(rest)), initializer=_init_worker, initargs=(problem,)) as pool:
            done = pool.map(_worker_goodput, [(c, start) for _, c, start in rest])
            for (i, _, _), result in zip(rest, done):
                results[i] = result
                if on_result is not None:
                    on_result(result)
    else:
        for i, c, start in rest:
            results[i] = goodput(problem, c, start_rps=start)
            if on_result is not None:
                on_result(results[i])
    return results


_WORKER_PROBLEM: PlacementProblem | None = None  # one per worker process, sent once


def _init_worker(problem: PlacementProblem) -> None:
    global _WORKER_PROBLEM
    _WORKER_PROBLEM = problem


def _worker_goodput(task: tuple[Candidate, float]) -> PlacementResult:
    c, start = task
    return goodput(_WORKER_PROBLEM, c, start_rps=start)


def search_placement(problem: PlacementProblem, num_gpus: int, tps: Sequence[int] = (1, 2, 4, 8),
                     colocated: bool = True, disaggregated: bool = True, prefill_tps: Sequence[int] | None = None,
                     decode_tps: Sequence[int] | None = None, jobs: int = 1,
                     one_gpu_pairs: Sequence[str] = ()) -> list[PlacementResult]:
    """All candidate layouts (and the one-GPU pairs asked for, `shared_gpu_pairs`), best per-GPU goodput first
    (ties: fewer GPUs, then name)."""
    found = candidates(num_gpus, tps, colocated, disaggregated, prefill_tps, decode_tps) + shared_gpu_pairs(one_gpu_pairs)
    return rank(evaluate(problem, found, jobs))
