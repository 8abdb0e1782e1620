"""How close a simulated run is to the real run of the same requests: errors of the metrics that matter.

Targets (docs/facts.md): below saturation, TTFT and TPOT p50 within 10% and p90 within 15% (5% as the aim); past it,
goodput within 10%.
`fidelity_table` compares records; replaying a result's real runs in the simulator to get them is
`pdlab.fidelity`'s (`replay_pairs`, `write_fidelity`), above the simulator and the runner, which this package
sits below (`python -m pdlab.fidelity`).
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from pdlab.metrics.records import RequestRecord
from pdlab.metrics.summary import summarize

METRICS = ("ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "tpot_p90_ms", "request_throughput_rps",
           "output_throughput_tokens_per_s", "goodput_rps")
TARGET = 0.05


def fidelity_table(pairs: dict[str, tuple[Sequence[RequestRecord], Sequence[RequestRecord]]],
                   metrics: Sequence[str] = METRICS, slo_ttft_s: float | None = None,
                   slo_tpot_s: float | None = None) -> pd.DataFrame:
    """One row per (label, metric): the real and simulated values and the relative error (sim / real - 1).

    `pairs`: label -> (real records, simulated records) of the same request list; goodput is judged
    against the SLOs given (none: no goodput row values).
    """
    rows = []
    for label, (real, sim) in pairs.items():
        real_summary, sim_summary = summarize(real, slo_ttft_s, slo_tpot_s), summarize(sim, slo_ttft_s, slo_tpot_s)
        for metric in metrics:
            r, s = real_summary.get(metric), sim_summary.get(metric)
            error = None if r in (None, 0) or s is None else s / r - 1
            rows.append({"run": label, "metric": metric, "real": r, "sim": s, "error": error,
                         "within_target": None if error is None else abs(error) <= TARGET})
    return pd.DataFrame(rows)


def pairs_from_result(result) -> dict[str, tuple[list[RequestRecord], list[RequestRecord]]]:
    """The (real, sim) record pairs of an `ExperimentResult` whose runs have `backend: both`."""
    pairs = {}
    for run in result.runs.values():
        if run.backend != "real" or run.run.backend != "both":
            continue
        twin = next(r for r in result.runs.values()
                    if r.run.name == run.run.name and r.backend == "sim" and r.rate_rps == run.rate_rps)
        pairs[run_label(run)] = (run.records, twin.records)
    return pairs


def run_label(run) -> str:
    """A real run's label in the error table: its name, and its rate in a sweep."""
    return run.run.name if run.rate_rps is None else f"{run.run.name}@{run.rate_rps:g}"

