"""Figures from request records, several runs side by side.

Figures are built with matplotlib's object API (`Figure`, never `pyplot`), so no
GUI backend is needed or touched: they render to files through Agg and SVG on
a headless machine, show inline in Jupyter, and leave no global figure behind.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pdlab.metrics.records import RequestRecord

Runs = Mapping[str, Sequence[RequestRecord]]
MAX_TIMELINE_REQUESTS = 300  # more rows than a figure's pixels blur into a band: draw every k-th request


def _plot_cdf(ax, values_ms: Sequence[float], label: str) -> None:
    if not values_ms:
        return
    x = np.sort(np.asarray(values_ms, dtype=np.float64))
    x = np.concatenate([x[:1], x])  # the curve rises from 0 at the smallest value
    y = np.arange(len(x)) / (len(x) - 1)
    ax.step(x, y, where="post", label=f"{label} (n={len(values_ms)})")


def cdf_figure(runs: Runs, slo_ttft_s: float | None = None, slo_tpot_s: float | None = None) -> Figure:
    """CDFs of TTFT and TPOT (ms), one line per run, SLOs as dashed lines."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_ttft, ax_tpot = fig.subplots(1, 2)
    for name, records in runs.items():
        done = [r for r in records if r.ok]
        _plot_cdf(ax_ttft, [r.ttft_s * 1e3 for r in done], name)
        _plot_cdf(ax_tpot, [r.tpot_s * 1e3 for r in done if r.tpot_s is not None], name)
    for ax, title, slo_s in ((ax_ttft, "TTFT", slo_ttft_s), (ax_tpot, "TPOT", slo_tpot_s)):
        if slo_s is not None:
            ax.axvline(slo_s * 1e3, color="gray", linestyle="--", label=f"SLO {slo_s * 1e3:g} ms")
        ax.set(title=f"{title} CDF", xlabel=f"{title} (ms)", ylabel="fraction of requests", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(loc="lower right")
    return fig


def timeline_figure(runs: Runs, max_requests: int = MAX_TIMELINE_REQUESTS) -> Figure:
    """Per request (rows, in arrival order): waiting + prefill up to the first token, then decode.

    Failed requests are drawn in red from arrival to their last known time. A run of more than
    `max_requests` requests shows one in every k of them (its title says so).
    """
    fig = Figure(figsize=(5.5 * max(1, len(runs)), 4.5), layout="constrained")
    axes = fig.subplots(1, max(1, len(runs)), sharex=True, sharey=True, squeeze=False)[0]
    for ax, (name, records) in zip(axes, runs.items(), strict=False):
        ordered = sorted(records, key=lambda r: r.arrival_s)
        step = max(1, -(-len(ordered) // max_requests))  # ceil
        title = name if step == 1 else f"{name} (1 in {step} of {len(ordered):,} requests)"
        rows = np.arange(0, len(ordered), step)
        ordered = ordered[::step]
        ok = np.array([r.ok for r in ordered], dtype=bool)
        arrival = np.array([r.arrival_s for r in ordered])
        first = np.array([np.nan if r.first_token_s is None else r.first_token_s for r in ordered])
        finish = np.array([np.nan if r.finish_s is None else r.finish_s for r in ordered])
        ax.hlines(rows[ok], arrival[ok], first[ok], color="tab:orange", linewidth=1.5, label="arrival to first token")
        ax.hlines(rows[ok], first[ok], finish[ok], color="tab:blue", linewidth=1.5, label="first token to finish")
        if (~ok).any():
            end = np.where(np.isnan(finish), np.where(np.isnan(first), arrival, first), finish)
            ax.hlines(rows[~ok], arrival[~ok], end[~ok], color="tab:red", linewidth=1.5, label="failed")
            ax.plot(end[~ok], rows[~ok], "x", color="tab:red")
        ax.plot(arrival, rows, "|", color="black", markersize=4, label="arrival")
        ax.set(title=title, xlabel="time since start (s)")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("request (arrival order)")
    if len(runs) and axes[0].has_data():
        axes[0].legend(loc="lower right", fontsize="small")
    return fig


def save_figure(fig: Figure, path_without_ext: str | Path, formats: Iterable[str] = ("png", "svg")) -> list[Path]:
    """Write `fig` once per format (parent folders created); return the paths written."""
    base = Path(path_without_ext)
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = base.with_name(f"{base.name}.{fmt}")
        fig.savefig(path, format=fmt, dpi=150)
        paths.append(path)
    return paths


def sweep_figure(sweep, slo: str = "") -> Figure:
    """Goodput (req/s within SLO) and SLO attainment against the offered rate, one line per run and backend.

    `sweep`: `ExperimentResult.sweep` (columns run, backend, rate_rps, goodput_rps, slo_attainment,
    request_throughput_rps). Real runs are solid, simulated ones dashed.
    """
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_good, ax_att = fig.subplots(1, 2)
    for (run, backend), rows in sweep.groupby(["run", "backend"], sort=False):
        rows = rows.sort_values("rate_rps")
        style = "--" if backend == "sim" else "-"
        label = f"{run} ({backend})"
        good = rows["goodput_rps"] if rows["goodput_rps"].notna().any() else rows["request_throughput_rps"]
        ax_good.plot(rows["rate_rps"], good, style, marker="o", label=label)
        if rows["slo_attainment"].notna().any():
            ax_att.plot(rows["rate_rps"], rows["slo_attainment"] * 100, style, marker="o", label=label)
    top = float(np.nanmax(sweep["rate_rps"])) if len(sweep) else 1.0
    ax_good.plot([0, top], [0, top], color="gray", linewidth=0.8, linestyle=":", label="offered rate")
    ax_good.set(title="Goodput against offered rate", xlabel="offered rate (req/s)",
                ylabel="goodput (req/s meeting the SLOs)" if slo else "throughput (req/s)")
    ax_att.set(title=f"SLO attainment{f' ({slo})' if slo else ''}", xlabel="offered rate (req/s)",
               ylabel="requests meeting both SLOs (%)", ylim=(0, 102))
    for ax in (ax_good, ax_att):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    return fig


def interference_figure(runs: Runs, bin_s: float = 0.25) -> Figure:
    """Decode stalls made visible: every inter-token gap (ms) against when it happened, one panel per run,
    with the arrivals of new prompts marked below. In a colocated run the gaps jump while new prompts
    are prefilled beside the decodes; on a disaggregated decode instance they stay flat."""
    fig = Figure(figsize=(5.5 * max(1, len(runs)), 4), layout="constrained")
    axes = fig.subplots(1, max(1, len(runs)), sharey=True, squeeze=False)[0]
    for ax, (name, records) in zip(axes, runs.items(), strict=False):
        times, gaps = [], []
        for r in records:
            t = r.token_times_s
            times += list(t[1:])
            gaps += [(b - a) * 1e3 for a, b in zip(t, t[1:], strict=False)]
        if gaps:
            ax.plot(times, gaps, ".", markersize=2, alpha=0.4, color="tab:blue", label="inter-token gap")
            edges = np.arange(0, max(times) + bin_s, bin_s)
            idx = np.digitize(times, edges)
            p90 = [np.percentile(np.asarray(gaps)[idx == i], 90) if (idx == i).any() else np.nan
                   for i in range(1, len(edges))]
            ax.plot(edges[1:], p90, color="tab:orange", label=f"p90 per {bin_s:g} s")
        arrivals = [r.arrival_s for r in records]
        ax.plot(arrivals, np.zeros(len(arrivals)), "|", color="black", markersize=8, label="prompt arrives")
        ax.set(title=name, xlabel="time since start (s)", yscale="symlog")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("inter-token gap (ms)")
    if axes[0].has_data():
        axes[0].legend(loc="upper right", fontsize="small")
    return fig
