"""What a served instance adds to each decode step, measured from a real run's token intervals.

A client sees a request's tokens one step apart. Between two of them where no request arrived shortly
before or during (so no prefill step ran in between), the gap is one served decode step: the engine's step
for the requests decoding then, plus whatever the serving loop adds (scheduling, output messages, the
client's side). Subtracting the engine's own step at that batch and context (a profile's `decode_s`)
leaves the served overhead; its median per batch size is the table `pdlab.sim.cost.ServedCost` takes.

Measured on the one-GPU runs of an H100 (colocated, lowest rate): within 0.5 ms of nothing up to 11
requests a step, then ~2 ms at 12-15 and 3-4 ms from 16 on. Runs at light load measure it best: under
load the gaps also hold prefill chunks that no arrival announced within the window.
"""

from __future__ import annotations

import bisect
import statistics
from collections.abc import Callable, Iterable

from pdlab.metrics.records import RequestRecord

QUIET_BEFORE_S = 0.3  # no arrival this long before a gap: a prompt arriving then may still be prefilling
BATCH_EDGES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)  # the buckets' lower edges
MIN_GAPS = 30  # a bucket with fewer gaps says nothing


def decode_gaps(records: Iterable[RequestRecord]) -> list[tuple[int, float, float]]:
    """(requests decoding, their mean context in tokens, seconds) of every gap between two consecutive tokens
    of a request with no arrival in the QUIET_BEFORE_S before it or during it."""
    done = [r for r in records if r.ok]
    arrivals = sorted(r.arrival_s for r in done)
    spans = sorted((r.first_token_s, r.finish_s, r.num_prompt_tokens) for r in done)
    gaps = []
    for r in done:
        times = r.token_times_s
        for i in range(len(times) - 1):
            a, b = times[i], times[i + 1]
            j = bisect.bisect_left(arrivals, a - QUIET_BEFORE_S)
            if j < len(arrivals) and arrivals[j] <= b:
                continue
            mid = (a + b) / 2
            active = [(start, prompt) for start, end, prompt in spans[: bisect.bisect_right(spans, (mid, float("inf")))]
                      if end >= mid]
            # A request's context at mid: its prompt plus the tokens it has made since its first (this one's i).
            context = statistics.fmean(prompt for _, prompt in active) + i
            gaps.append((len(active), context, b - a))
    return gaps


def served_overhead_ms(records: Iterable[RequestRecord], decode_s: Callable[[float, float], float],
                       edges: tuple[int, ...] = BATCH_EDGES) -> dict[int, float]:
    """{batch: ms} of the served overhead (module docstring): per bucket of requests decoding (`edges`), at the
    bucket's median batch, the median of gap - decode_s(batch, context), never below 0. Buckets with fewer
    than MIN_GAPS gaps are left out; an empty dict when none has enough."""
    buckets: dict[int, list[tuple[int, float]]] = {}
    for batch, context, seconds in decode_gaps(records):
        edge = edges[max(0, bisect.bisect_right(edges, batch) - 1)]
        buckets.setdefault(edge, []).append((batch, seconds - decode_s(batch, context)))
    table = {}
    for edge in sorted(buckets):
        rows = buckets[edge]
        if len(rows) < MIN_GAPS:
            continue
        batch = round(statistics.median(b for b, _ in rows))
        table[batch] = max(0.0, statistics.median(extra for _, extra in rows) * 1e3)
    return table
