"""How close a simulated run is to the real run of the same requests: errors of the metrics that matter.

The issue's target (DESIGN.md): TTFT and TPOT p50 and p90 and throughput within 5%.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from pdlab.metrics.records import RequestRecord
from pdlab.metrics.summary import summarize

METRICS = ("ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "tpot_p90_ms", "request_throughput_rps",
           "output_throughput_tokens_per_s")
TARGET = 0.05


def fidelity_table(pairs: dict[str, tuple[Sequence[RequestRecord], Sequence[RequestRecord]]],
                   metrics: Sequence[str] = METRICS) -> pd.DataFrame:
    """One row per (label, metric): the real and simulated values and the relative error (sim / real - 1).

    `pairs`: label -> (real records, simulated records) of the same request list.
    """
    rows = []
    for label, (real, sim) in pairs.items():
        real_summary, sim_summary = summarize(real), summarize(sim)
        for metric in metrics:
            r, s = real_summary.get(metric), sim_summary.get(metric)
            error = None if r in (None, 0) or s is None else s / r - 1
            rows.append({"run": label, "metric": metric, "real": r, "sim": s, "error": error,
                         "within_target": None if error is None else abs(error) <= TARGET})
    return pd.DataFrame(rows)


def replay_pairs(result) -> dict[str, tuple[list[RequestRecord], list[RequestRecord]]]:
    """(real, sim) record pairs for every real run of `result` (e.g. a GPU run under data/results/): the twin
    recorded beside it when the run said `backend: both`, else the run's request list replayed in the
    simulator now, with the run's settings (its profile table, when it names one), at the same rate."""
    from pdlab.run import run_sim

    pairs = pairs_from_result(result)
    exp = result.experiment
    for run in result.runs.values():
        label = _label(run)
        if run.backend != "real" or label in pairs:
            continue
        sim = run_sim(exp if run.rate_rps is None else exp.at_rate(run.rate_rps), run.run, progress=False).records
        real_requests = sorted((r.request_id, round(r.arrival_s, 6), r.num_prompt_tokens) for r in run.records)
        sim_requests = sorted((r.request_id, round(r.arrival_s, 6), r.num_prompt_tokens) for r in sim)
        if real_requests != sim_requests:
            raise ValueError(f"{label}: the simulator's request list differs from the recorded one")
        pairs[label] = (run.records, sim)
    return pairs


def pairs_from_result(result) -> dict[str, tuple[list[RequestRecord], list[RequestRecord]]]:
    """The (real, sim) record pairs of an `ExperimentResult` whose runs have `backend: both`."""
    pairs = {}
    for run in result.runs.values():
        if run.backend != "real" or run.run.backend != "both":
            continue
        twin = next(r for r in result.runs.values()
                    if r.run.name == run.run.name and r.backend == "sim" and r.rate_rps == run.rate_rps)
        pairs[_label(run)] = (run.records, twin.records)
    return pairs


def _label(run) -> str:
    """A real run's label in the error table: its name, and its rate in a sweep."""
    return run.run.name if run.rate_rps is None else f"{run.run.name}@{run.rate_rps:g}"
