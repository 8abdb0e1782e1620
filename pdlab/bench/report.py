"""A benchmark's printed table and its files (records CSV, summary JSON)."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from pdlab.bench.config import BenchConfig
from pdlab.metrics.records import RequestRecord, write_records_csv
from pdlab.metrics.summary import LATENCY_METRICS, STATS

MAX_ERRORS_SHOWN = 5
WIDTH = 60


def first_errors(records: Sequence[RequestRecord], limit: int = MAX_ERRORS_SHOWN) -> list[tuple[str, int]]:
    """The distinct error messages in order of first appearance, with how many requests had each."""
    counts = Counter(r.error for r in records if r.error is not None)
    return list(counts.items())[:limit]


def _num(value, fmt: str = ",.2f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def format_report(config: BenchConfig, records: Sequence[RequestRecord], summary: dict) -> str:
    rate = "inf" if math.isinf(config.request_rate_rps) else f"{config.request_rate_rps:g} req/s"
    arrivals = "trace" if config.trace_arrivals else (config.arrival if rate != "inf" else "all at once")
    if config.arrival == "gamma" and not config.trace_arrivals:
        arrivals += f" (cv {config.cv:.3g})"
    rows = [
        ("endpoint", config.url),
        ("model", summary["model"]),
        ("prompts", summary["prompts"]),
        ("request rate", f"{rate}, {arrivals}"),
        ("max concurrency", config.max_concurrency or "-"),
        ("requests completed / failed",
         f"{summary['num_completed']} / {summary['num_errors']} (of {summary['num_requests']})"),
        ("duration (s)", _num(summary["duration_s"])),
        ("total input / output tokens", f"{summary['total_prompt_tokens']:,} / {summary['total_output_tokens']:,}"),
        ("request throughput (req/s)", _num(summary["request_throughput_rps"])),
        ("output token throughput (tok/s)", _num(summary["output_throughput_tokens_per_s"])),
        ("total token throughput (tok/s)", _num(summary["total_throughput_tokens_per_s"])),
        ("max requests in flight", summary["max_in_flight"]),
        ("max send lag (ms)", _num(summary["send_lag_max_ms"])),
    ]
    if summary["slo_attainment"] is not None:
        slos = ", ".join(f"{name} <= {summary[f'slo_{name.lower()}_ms']:g} ms" for name in ("TTFT", "TPOT")
                         if summary[f"slo_{name.lower()}_ms"] is not None)
        rows += [
            ("SLO", slos),
            ("SLO attainment", f"{summary['slo_attainment']:.1%} ({summary['num_meeting_slo']} requests)"),
            ("goodput (req/s)", _num(summary["goodput_rps"])),
        ]
    title = f" pdlab serving benchmark: {config.label} "
    lines = [title.center(WIDTH, "=")]
    lines += [f"{name + ':':<34}{value}" for name, value in rows]
    lines.append(" latency (ms) ".center(WIDTH, "-"))
    lines.append(f"{'':<10}" + "".join(f"{stat:>12}" for stat in STATS))
    for metric in LATENCY_METRICS:
        lines.append(f"{metric.upper():<10}" + "".join(f"{_num(summary[f'{metric}_{stat}_ms']):>12}" for stat in STATS))
    lines.append("=" * WIDTH)
    errors = first_errors(records)
    if errors:
        lines.append(f"{summary['num_errors']} requests failed; first errors:")
        lines += [f"  [{count}x] {message}" for message, count in errors]
    return "\n".join(lines)


def write_outputs(config: BenchConfig, records: Sequence[RequestRecord], summary: dict, out_dir: str | Path
                  ) -> list[Path]:
    """Write `records.csv` (the schema `pdlab.run` writes) and `summary.json` under `out_dir`; return the paths."""
    from pdlab.provenance import git_commit, versions

    out_dir = Path(out_dir)
    records_path = write_records_csv(records, out_dir / "records.csv")
    meta = {
        "summary": summary,
        "config": config.describe(),
        "errors": [{"message": message, "count": count} for message, count in first_errors(records, 20)],
        "git_commit": git_commit(),
        "versions": versions(("pdlab", "httpx", "numpy")),
    }
    summary_path = out_dir / "summary.json"
    summary_path.write_text(json.dumps(meta, indent=2, default=str))
    return [records_path, summary_path]
