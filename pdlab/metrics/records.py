"""One row per request: what every run writes, whichever backend produced it.

`python -m pdlab.run`, the simulator and a benchmark client all write this
schema, so one summary and one set of plots read them all. All times are
seconds from the start of the run. In CSV, `token_times_s` is a JSON list and
a missing value is an empty cell.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

import pandas as pd

# The schema's columns, in file order; the derived latencies follow them in frames and CSV.
FIELDS = (
    "request_id",
    "backend",
    "mode",
    "arrival_s",
    "first_token_s",
    "finish_s",
    "num_prompt_tokens",
    "num_output_tokens",
    "finish_reason",
    "token_times_s",
    "error",
)
DERIVED = ("ttft_s", "tpot_s", "e2e_s")


@dataclass(frozen=True)
class RequestRecord:
    request_id: str
    backend: str  # "real" or "sim"
    mode: str  # "colocated" or "disaggregated"
    arrival_s: float
    first_token_s: float | None
    finish_s: float | None
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    token_times_s: tuple[float, ...] = ()  # when each output token reached the client
    error: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "token_times_s", tuple(self.token_times_s))

    @property
    def ok(self) -> bool:
        """Finished without error, with at least its first token."""
        return self.error is None and self.first_token_s is not None and self.finish_s is not None

    @property
    def ttft_s(self) -> float | None:
        """Time to first token: arrival to first token."""
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (finish - first) / (n_out - 1); None below 2 tokens."""
        if self.first_token_s is None or self.finish_s is None or self.num_output_tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.num_output_tokens - 1)

    @property
    def e2e_s(self) -> float | None:
        """End-to-end latency: arrival to finish."""
        return None if self.finish_s is None else self.finish_s - self.arrival_s

    @property
    def itl_s(self) -> list[float]:
        """Inter-token latencies: the gaps between consecutive output tokens."""
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:], strict=False)]


def records_to_frame(records: Iterable[RequestRecord]) -> pd.DataFrame:
    """One row per record: the schema's columns, then ttft_s, tpot_s and e2e_s.

    `token_times_s` holds Python lists; missing times are NaN, missing strings None.
    """
    rows = [
        {**{name: getattr(r, name) for name in FIELDS}, **{name: getattr(r, name) for name in DERIVED}} for r in records
    ]
    frame = pd.DataFrame(rows, columns=[*FIELDS, *DERIVED])
    frame["token_times_s"] = frame["token_times_s"].map(list)
    for name in ("arrival_s", "first_token_s", "finish_s", *DERIVED):
        frame[name] = frame[name].astype("float64")
    for name in ("num_prompt_tokens", "num_output_tokens"):
        frame[name] = frame[name].astype("int64")
    return frame


def frame_to_records(frame: pd.DataFrame) -> list[RequestRecord]:
    """The inverse of `records_to_frame` (derived columns are ignored)."""
    names = [f.name for f in fields(RequestRecord)]
    return [RequestRecord(**{name: _cell(name, row[name]) for name in names}) for row in frame.to_dict("records")]


def _cell(name: str, value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return () if name == "token_times_s" else None
    if name in ("num_prompt_tokens", "num_output_tokens"):
        return int(value)
    if name in ("arrival_s", "first_token_s", "finish_s"):
        return float(value)
    if name == "token_times_s":
        return tuple(float(t) for t in (json.loads(value) if isinstance(value, str) else value))
    return str(value)


_STR_COLUMNS = ("request_id", "backend", "mode", "finish_reason", "token_times_s", "error")


def write_records_csv(records: Iterable[RequestRecord], path: str | Path) -> Path:
    """Write records to CSV (parent folders created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = records_to_frame(records)
    frame["token_times_s"] = frame["token_times_s"].map(json.dumps)
    frame.to_csv(path, index=False)
    return path


def read_records_csv(path: str | Path) -> list[RequestRecord]:
    # Only empty cells are missing: a request id or error text "NA" stays a string.
    frame = pd.read_csv(path, dtype={name: str for name in _STR_COLUMNS}, keep_default_na=False, na_values=[""])
    return frame_to_records(frame)
