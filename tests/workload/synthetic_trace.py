"""Small seeded traces in the layout of the shared Azure traces, written where a test asks.

The Azure LLM inference traces (../shared/data/traces/, Vidur's processed copies) must not be copied into
this repository, so the tests that read traces also run on these: the same CSV columns (`arrived_at` in
seconds from the first request, `num_prefill_tokens`, `num_decode_tokens`), a few hundred rows drawn from
seeded distributions, with the rows returned for the test to check against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

HEADER = "arrived_at,num_prefill_tokens,num_decode_tokens"


@dataclass(frozen=True)
class SyntheticTrace:
    path: Path
    arrival_s: np.ndarray  # sorted, from 0
    num_prompt_tokens: np.ndarray
    num_output_tokens: np.ndarray


def write_trace(path: Path, num_requests: int = 400, seed: int = 0, bursty: bool = False) -> SyntheticTrace:
    """Poisson arrivals at ~5.5 requests/s (like the conversation trace), or, `bursty`, bursts of requests
    milliseconds apart separated by three minute-long lulls (like the code trace: gaps' CV > 10).
    Lognormal lengths with the conversation trace's medians (prompt ~1000, output ~130 tokens)."""
    rng = np.random.default_rng(seed)
    if bursty:
        gaps = rng.exponential(0.01, num_requests - 1)
        gaps[rng.choice(num_requests - 1, 3, replace=False)] = 60.0
    else:
        gaps = rng.exponential(1 / 5.5, num_requests - 1)
    arrival_s = np.round(np.concatenate([[0.0], np.cumsum(gaps)]), 6)
    prompts = np.clip(rng.lognormal(np.log(1000), 0.8, num_requests), 1, 14_000).astype(np.int64)
    outputs = np.clip(rng.lognormal(np.log(130), 1.0, num_requests), 1, 1000).astype(np.int64)
    rows = [f"{t!r},{p},{o}" for t, p, o in zip(arrival_s.tolist(), prompts.tolist(), outputs.tolist())]
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return SyntheticTrace(path, arrival_s, prompts, outputs)
