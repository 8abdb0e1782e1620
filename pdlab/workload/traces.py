"""Production request traces: load, describe, and turn into arrivals and lengths.

Two CSV layouts of the Azure LLM inference trace 2023 (Splitwise, ISCA'24) are
read, and both become one table with columns `arrival_s` (seconds from the
first request, sorted), `num_prompt_tokens` and `num_output_tokens`:

- the raw Azure files: `TIMESTAMP` (a date and time), `ContextTokens`, `GeneratedTokens`;
- Vidur's processed copies: `arrived_at` (seconds), `num_prefill_tokens`, `num_decode_tokens`.

pdlab ships no trace: users point it at their own copy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pdlab.errors import ConfigError
from pdlab.workload.arrivals import TraceArrivals
from pdlab.workload.lengths import EmpiricalLength

COLUMNS = ("arrival_s", "num_prompt_tokens", "num_output_tokens")
_LAYOUTS = {
    "azure": ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
    "vidur": ("arrived_at", "num_prefill_tokens", "num_decode_tokens"),
}


def load_trace(path: str | Path) -> pd.DataFrame:
    """Read a trace CSV into the common table; ConfigError if missing or of an unknown layout."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: trace file not found")
    try:
        raw = pd.read_csv(path, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a readable CSV trace: {e}") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    layout = next((name for name, cols in _LAYOUTS.items() if set(cols) <= set(raw.columns)), None)
    if layout is None:
        expected = " or ".join(", ".join(cols) for cols in _LAYOUTS.values())
        raise ConfigError(
            f"{path}: unknown trace layout; expected the columns {expected}; found {', '.join(raw.columns)}"
        )
    time_col, prompt_col, output_col = _LAYOUTS[layout]
    try:
        if layout == "azure":
            stamps = pd.to_datetime(raw[time_col], format="ISO8601")
            arrival_s = (stamps - stamps.min()).dt.total_seconds()
        else:
            arrival_s = raw[time_col].astype(np.float64)
            arrival_s = arrival_s - arrival_s.min()
        trace = pd.DataFrame(
            {
                "arrival_s": arrival_s.to_numpy(np.float64),
                "num_prompt_tokens": raw[prompt_col].astype(np.int64).to_numpy(),
                "num_output_tokens": raw[output_col].astype(np.int64).to_numpy(),
            }
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: bad value in the trace: {e}") from None
    if trace.empty:
        raise ConfigError(f"{path}: the trace has no rows")
    return trace.sort_values("arrival_s", kind="stable").reset_index(drop=True)


def trace_stats(trace: pd.DataFrame) -> dict[str, float]:
    """Counts, rate, burstiness (cv of inter-arrival gaps) and length percentiles."""
    n = len(trace)
    span_s = float(trace["arrival_s"].iloc[-1] - trace["arrival_s"].iloc[0]) if n else 0.0
    gaps = np.diff(trace["arrival_s"].to_numpy())
    stats: dict[str, float] = {
        "num_requests": n,
        "span_s": span_s,
        "rate_rps": (n - 1) / span_s if span_s > 0 else float("nan"),
        "interarrival_cv": float(gaps.std() / gaps.mean()) if len(gaps) and gaps.mean() > 0 else float("nan"),
    }
    for column, prefix in (("num_prompt_tokens", "prompt"), ("num_output_tokens", "output")):
        values = trace[column].to_numpy()
        stats[f"{prefix}_mean_tokens"] = float(values.mean()) if n else float("nan")
        for q in (50, 90, 99):
            stats[f"{prefix}_p{q}_tokens"] = float(np.percentile(values, q)) if n else float("nan")
        stats[f"{prefix}_max_tokens"] = float(values.max()) if n else float("nan")
    return stats


def trace_arrivals(trace: pd.DataFrame, rate_rps: float | None = None) -> TraceArrivals:
    """The trace's arrival times, to be replayed in order, optionally scaled to `rate_rps`."""
    return TraceArrivals(tuple(trace["arrival_s"].tolist()), rate_rps)


def replay_arrivals(trace: pd.DataFrame, num_requests: int, rate_rps: float | None = None) -> np.ndarray:
    """The first `num_requests` arrival times, starting at 0, with mean rate `rate_rps` if given."""
    return trace_arrivals(trace, rate_rps).sample(num_requests)


def trace_lengths(
    trace: pd.DataFrame,
    column: str,
    replay: bool = False,
    min_tokens: int = 1,
    max_tokens: int | None = None,
) -> EmpiricalLength:
    """An empirical length distribution over one column (`num_prompt_tokens` or `num_output_tokens`)."""
    if column not in ("num_prompt_tokens", "num_output_tokens"):
        raise ValueError(f"column must be num_prompt_tokens or num_output_tokens, got {column!r}")
    return EmpiricalLength(tuple(trace[column].tolist()), replay, min_tokens, max_tokens)
