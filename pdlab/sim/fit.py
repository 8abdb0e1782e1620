"""Fit the roofline's efficiencies to step times measured on a real engine (a `python -m pdlab.profiler` table).

    fit = fit_roofline(ProfileRows.from_csv("data/profiles/llama3-8b-h100.csv"), RooflineCost(PRESETS["llama3-8b"]))
    cost = fit.cost  # the same RooflineCost with the fitted efficiencies and overhead

The roofline says a step takes

    t = max(F / (peak * compute_efficiency), B / (bandwidth * bandwidth_efficiency)) + overhead + all-reduce

for its FLOPs F and bytes B (`RooflineCost.step_work`). With each row's
bound (compute or memory) known, t is linear in 1/compute_efficiency,
1/bandwidth_efficiency and the overhead, so those three come from least
squares (of relative errors: a 1 ms overhead must count next to 500 ms
prefills). The bounds are not known, so the fit alternates: classify the
rows with the current parameters, solve, reclassify, until no row changes
side (the classic fit of a piecewise-linear model with known pieces). The
all-reduce term is not fitted (it is zero at TP 1, where profiles are taken).
An efficiency no row constrains (every row memory-bound, say) keeps the
value of the cost model passed in.

Standard library only.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pdlab.policy.request import Request
from pdlab.policy.scheduler import ScheduledBatch, ScheduledRequest
from pdlab.sampling_params import SamplingParams
from pdlab.sim.cost import RooflineCost

# The batch of a profile row only needs positions; every item can point at the same request.
_PROFILE_REQUEST = Request("profile", [0], SamplingParams())


def row_batch(row: Mapping) -> ScheduledBatch:
    """The batch a profile row timed: one whole prompt, or `num_seqs` one-token decodes at `context_tokens`."""
    if row["phase"] == "prefill":
        return ScheduledBatch([ScheduledRequest(_PROFILE_REQUEST, 0, int(row["num_tokens"]), True)])
    if row["phase"] == "decode":
        context = int(row["context_tokens"])
        return ScheduledBatch([ScheduledRequest(_PROFILE_REQUEST, context, 1, True)] * int(row["num_seqs"]))
    raise ValueError(f"unknown phase {row['phase']!r} in a profile row")


def read_profile(path: str | Path) -> list[dict]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


@dataclass(frozen=True)
class RooflineFit:
    cost: RooflineCost  # the model passed in, with the fitted values
    num_compute_bound: int
    num_memory_bound: int
    rms_error_s: float
    max_relative_error: float  # the worst row's |predicted - measured| / measured
    num_iterations: int


def fit_roofline(rows: Iterable[Mapping], cost: RooflineCost, max_iterations: int = 50) -> RooflineFit:
    """Least-squares `compute_efficiency`, `bandwidth_efficiency` and `step_overhead_s` of `cost` for `rows`.

    `rows` are profile rows (`phase`, `num_seqs`, `num_tokens`, `context_tokens`,
    `step_ms`, as `python -m pdlab.profiler` writes them) measured on the
    model and GPU `cost` describes. Raises ValueError when the rows cannot
    determine the fit (fewer than three, or all alike) or give an efficiency
    outside (0, 1] (then the GPU's peak numbers in `cost.gpu` are off).
    """
    rows = list(rows)
    if len(rows) < 3:
        raise ValueError(f"fitting three parameters needs at least 3 profile rows, got {len(rows)}")
    gpu = cost.gpu
    # Per row: seconds at 100% compute, seconds at 100% bandwidth, and the measured time less the all-reduce.
    points = []
    for row in rows:
        flops, bytes_, num_tokens = cost.step_work(row_batch(row))
        measured_s = float(row["step_ms"]) / 1e3
        points.append((flops / gpu.peak_flops, bytes_ / gpu.mem_bandwidth_bytes_per_s,
                       measured_s - cost.allreduce_s(num_tokens), measured_s))
    inv_ce, inv_be, overhead = 1 / cost.compute_efficiency, 1 / cost.bandwidth_efficiency, cost.step_overhead_s
    bounds: list[bool] | None = None  # True: compute-bound
    for iteration in range(1, max_iterations + 1):
        new_bounds = [c * inv_ce >= m * inv_be for c, m, _, _ in points]
        if new_bounds == bounds:
            break
        bounds = new_bounds
        inv_ce, inv_be, overhead = _solve(points, bounds, inv_ce, inv_be)
    for name, inverse in (("compute_efficiency", inv_ce), ("bandwidth_efficiency", inv_be)):
        if not inverse >= 1:
            raise ValueError(f"the fitted {name} is {1 / inverse if inverse > 0 else math.inf:.3g}, outside (0, 1]: "
                             f"the GPU's peak numbers ({gpu.name}) are too low for these step times")
    if overhead < 0:
        raise ValueError(f"the fitted step overhead is negative ({overhead * 1e3:.3g} ms): the roofline does not "
                         f"describe these step times")
    fitted = replace(cost, compute_efficiency=1 / inv_ce, bandwidth_efficiency=1 / inv_be, step_overhead_s=overhead)
    errors = [fitted_s - measured_s for fitted_s, (_, _, _, measured_s) in
              zip((fitted.step_time_s(row_batch(row)) for row in rows), points)]
    return RooflineFit(
        cost=fitted,
        num_compute_bound=sum(bounds),
        num_memory_bound=len(bounds) - sum(bounds),
        rms_error_s=math.sqrt(sum(e * e for e in errors) / len(errors)),
        max_relative_error=max(abs(e) / p[3] for e, p in zip(errors, points)),
        num_iterations=iteration,
    )


def _solve(points: Sequence[tuple[float, float, float, float]], bounds: Sequence[bool], inv_ce: float,
           inv_be: float) -> tuple[float, float, float]:
    """Weighted least squares of y = inv_ce * c (compute-bound rows) + inv_be * m (memory-bound rows) + overhead.

    A side with no rows keeps its coefficient: its term is then known and moves to the left-hand side.
    """
    have_compute, have_memory = any(bounds), not all(bounds)
    columns, targets = [], []
    for (c, m, y, measured_s), compute in zip(points, bounds):
        x = []
        if have_compute:
            x.append(c if compute else 0.0)
        if have_memory:
            x.append(0.0 if compute else m)
        fixed = (0.0 if have_compute else c * inv_ce) if compute else (0.0 if have_memory else m * inv_be)
        # Relative errors: step times span three orders of magnitude, and a 1 ms overhead must not drown
        # in the noise of a 500 ms prefill.
        weight = 1 / measured_s
        columns.append([v * weight for v in (*x, 1.0)])
        targets.append((y - fixed) * weight)
    solution = _least_squares(columns, targets)
    if have_compute:
        inv_ce = solution.pop(0)
    if have_memory:
        inv_be = solution.pop(0)
    return inv_ce, inv_be, solution[0]


def _least_squares(rows: list[list[float]], targets: list[float]) -> list[float]:
    """argmin |A x - b| through the normal equations, columns scaled to unit size first."""
    k = len(rows[0])
    scale = [math.sqrt(sum(r[j] ** 2 for r in rows)) or 1.0 for j in range(k)]
    a = [[r[j] / scale[j] for j in range(k)] for r in rows]
    normal = [[sum(r[i] * r[j] for r in a) for j in range(k)] + [sum(r[i] * t for r, t in zip(a, targets))]
              for i in range(k)]
    for col in range(k):  # Gauss-Jordan with partial pivoting
        pivot = max(range(col, k), key=lambda i: abs(normal[i][col]))
        if abs(normal[pivot][col]) < 1e-12:
            raise ValueError("the profile rows cannot separate the roofline's parameters (too few distinct rows)")
        normal[col], normal[pivot] = normal[pivot], normal[col]
        for i in range(k):
            if i != col:
                f = normal[i][col] / normal[col][col]
                normal[i] = [v - f * w for v, w in zip(normal[i], normal[col])]
    return [normal[i][k] / normal[i][i] / scale[i] for i in range(k)]
