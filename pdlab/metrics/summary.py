"""Serving metrics of one run, as vLLM's serving benchmark and DistServe define them.

- TTFT: arrival to first token, per request.
- TPOT: (finish - first token) / (output tokens - 1), per request with >= 2
  output tokens; its statistics weight every request equally.
- ITL: every gap between consecutive output tokens, pooled over all requests
  (so weighted by tokens).
- E2E: arrival to finish, per request.
- Throughput: completed requests, output tokens and prompt + output tokens,
  each divided by the run's duration.
- SLO attainment: the fraction of *all* requests (failed ones count as misses)
  that finished with TTFT <= slo_ttft and TPOT <= slo_tpot (DistServe). As in
  vLLM's `--goodput`, a one-token output has TPOT 0 for this test.
- Goodput: requests meeting the SLOs per second of the run (vLLM's
  request_goodput). DistServe's goodput is a property of a rate sweep, the
  highest rate whose attainment reaches a target: `max_rate_meeting_target`.

Statistics over requests use only requests that completed without error.
Latencies are reported in milliseconds, as vLLM prints them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from pdlab.metrics.records import RequestRecord

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")
STATS = ("mean", "p50", "p90", "p99")


def _stats_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    if len(values_s) == 0:
        return dict.fromkeys(STATS)
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    return {
        "mean": float(ms.mean()),
        "p50": float(np.percentile(ms, 50)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
    }


def meets_slo(record: RequestRecord, slo_ttft_s: float | None, slo_tpot_s: float | None) -> bool:
    """Completed, and within every SLO given (a missing SLO always holds)."""
    if not record.ok:
        return False
    if slo_ttft_s is not None and record.ttft_s > slo_ttft_s:
        return False
    tpot_s = record.tpot_s if record.tpot_s is not None else 0.0
    return slo_tpot_s is None or tpot_s <= slo_tpot_s


def run_duration_s(records: Sequence[RequestRecord]) -> float:
    """From the first arrival to the last finish (0 when nothing finished)."""
    finishes = [r.finish_s for r in records if r.finish_s is not None]
    if not finishes:
        return 0.0
    return max(finishes) - min(r.arrival_s for r in records)


def summarize(
    records: Sequence[RequestRecord],
    slo_ttft_s: float | None = None,
    slo_tpot_s: float | None = None,
    duration_s: float | None = None,
) -> dict[str, float | int | None]:
    """Metrics of one run as a flat dict (keys such as `ttft_p90_ms`, `goodput_rps`).

    `duration_s` defaults to `run_duration_s(records)`; pass the measured wall
    time of the run when it is known. Rates are None when the duration is 0;
    goodput and SLO attainment are None when no SLO is given.
    """
    done = [r for r in records if r.ok]
    duration_s = run_duration_s(records) if duration_s is None else duration_s
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: None)
    num_prompt_tokens = sum(r.num_prompt_tokens for r in done)
    num_output_tokens = sum(r.num_output_tokens for r in done)

    summary: dict[str, float | int | None] = {
        "num_requests": len(records),
        "num_completed": len(done),
        "num_errors": sum(r.error is not None for r in records),
        "duration_s": duration_s,
        "total_prompt_tokens": num_prompt_tokens,
        "total_output_tokens": num_output_tokens,
        "request_throughput_rps": per_s(len(done)),
        "output_throughput_tokens_per_s": per_s(num_output_tokens),
        "total_throughput_tokens_per_s": per_s(num_prompt_tokens + num_output_tokens),
    }
    latencies_s = {
        "ttft": [r.ttft_s for r in done],
        "tpot": [r.tpot_s for r in done if r.tpot_s is not None],
        "itl": [gap for r in done for gap in r.itl_s],
        "e2e": [r.e2e_s for r in done],
    }
    for metric in LATENCY_METRICS:
        for stat, value in _stats_ms(latencies_s[metric]).items():
            summary[f"{metric}_{stat}_ms"] = value

    has_slo = slo_ttft_s is not None or slo_tpot_s is not None
    num_good = sum(meets_slo(r, slo_ttft_s, slo_tpot_s) for r in records)
    summary["slo_ttft_ms"] = None if slo_ttft_s is None else slo_ttft_s * 1e3
    summary["slo_tpot_ms"] = None if slo_tpot_s is None else slo_tpot_s * 1e3
    summary["num_meeting_slo"] = num_good if has_slo else None
    summary["slo_attainment"] = num_good / len(records) if has_slo and records else None
    summary["goodput_rps"] = per_s(num_good) if has_slo else None
    summary.update(start_check(records))
    return summary


SLOW_START_RATIO = 1.5


def start_check(records: Sequence[RequestRecord]) -> dict[str, float | bool | None]:
    """The TTFT p50 of the first tenth of the completed requests (by arrival) against the rest's, and
    whether the first tenth was slower by SLOW_START_RATIO: a deployment still compiling kernels or
    growing its allocator when the run began shows up there. None with fewer than 20 requests."""
    done = sorted((r for r in records if r.ok), key=lambda r: r.arrival_s)
    if len(done) < 20:
        return {"first_tenth_ttft_p50_ms": None, "rest_ttft_p50_ms": None, "slow_start": None}
    n = len(done) // 10
    first = float(np.median([r.ttft_s for r in done[:n]])) * 1e3
    rest = float(np.median([r.ttft_s for r in done[n:]])) * 1e3
    return {"first_tenth_ttft_p50_ms": first, "rest_ttft_p50_ms": rest, "slow_start": first > SLOW_START_RATIO * rest}


def summary_table(summaries: Mapping[str, Mapping[str, float | int | None]]) -> pd.DataFrame:
    """Several runs side by side: one row per metric, one column per run name."""
    table = pd.DataFrame({name: pd.Series(summary, dtype="float64") for name, summary in summaries.items()})
    table.index.name = "metric"
    return table


def max_rate_meeting_target(attainment_by_rate: Mapping[float, float], target: float = 0.9) -> float | None:
    """DistServe's goodput over a rate sweep: the highest rate at which it and every lower rate reach `target`.

    `attainment_by_rate` maps request rate (req/s) to SLO attainment. None when
    even the lowest rate misses the target.
    """
    best = None
    for rate in sorted(attainment_by_rate):
        if attainment_by_rate[rate] < target:
            break
        best = rate
    return best


def rank_by_sweep(sweep, target: float = 0.9, backend: str = "real") -> list[tuple[str, float | None, float]]:
    """Runs of a rate sweep, best first, by DistServe's goodput measured on the sweep's own rates: the highest
    rate at which a run and every lower rate reach `target` attainment (None: not even the lowest), ties broken
    by the attainment at the next rate. Returns (run, that rate, attainment at the next rate)."""
    rows = sweep[sweep["backend"] == backend]
    ranked = []
    for run, by_rate in rows.groupby("run", sort=False):
        attainment = dict(zip(by_rate["rate_rps"], by_rate["slo_attainment"]))
        best = max_rate_meeting_target(attainment, target)
        above = [rate for rate in sorted(attainment) if best is None or rate > best]
        ranked.append((run, best, attainment[above[0]] if above else 1.0))
    return sorted(ranked, key=lambda r: (-(r[1] or 0.0), -r[2]))


def crossings(sweep, run_a: str, run_b: str, metric: str = "goodput_rps", backend: str | None = None) -> list[float]:
    """Offered rates where two runs' `metric` curves cross in a sweep (`ExperimentResult.sweep`),
    interpolated linearly between neighbouring rates; empty if one stays ahead throughout."""
    rows = sweep if backend is None else sweep[sweep["backend"] == backend]
    a = rows[rows["run"] == run_a].groupby("rate_rps")[metric].mean()
    b = rows[rows["run"] == run_b].groupby("rate_rps")[metric].mean()
    rates = sorted(set(a.index) & set(b.index))
    diff = [(r, b[r] - a[r]) for r in rates if a[r] == a[r] and b[r] == b[r]]  # skip NaN
    found = []
    for (r0, d0), (r1, d1) in zip(diff, diff[1:]):
        if d0 == 0:
            found.append(float(r0))
        elif d0 * d1 < 0:
            found.append(float(r0 + (r1 - r0) * d0 / (d0 - d1)))
    return found
