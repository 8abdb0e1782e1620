"""`ProfileCost`: step times interpolated from a table measured on the real engine (`python -m pdlab.profiler`).

The table has prefill rows (one prompt of `num_tokens` in one step) and
decode rows (`num_seqs` sequences of `context_tokens` context, one token each).
A batch is costed as:
- prefill only: piecewise-linear in the step's batched tokens;
- decode only: piecewise-linear in the number of sequences at each profiled
  context, then linear between the two nearest contexts (by mean context);
- mixed (chunked prefill): one forward pass over all its tokens (the prefill
  rows at the step's batched tokens, decode tokens counted in) plus the
  decodes' attention over their contexts: their decode time at their mean
  context minus that at the shortest profiled one; never less than the
  decodes alone. (The larger of the two phases, an earlier rule, assumed
  they overlap inside one pass; they do not.)
- a prefill chunk after `s` cached tokens of its prompt attends to them too,
  which a prompt alone of the chunk's length does not: each such chunk of q
  tokens adds 2 * b * q * s, where b is the quadratic part of the prefill
  rows (their time as a * n + b * n^2 through the two longest rows), so that
  a prompt prefilled in chunks costs about what it costs in one step. On
  the one-GPU runs of an H100 this took the colocated code runs' TTFT p50
  from 8-26% low to 2-14% low.
Beyond the table's ends both axes extrapolate linearly from the last two points
(never below the smallest measured time).

Standard library only.
"""

from __future__ import annotations

import bisect
import csv
from dataclasses import dataclass
from pathlib import Path

from pdlab.policy.scheduler import ScheduledBatch

PROFILE_COLUMNS = ("phase", "num_seqs", "num_tokens", "context_tokens", "step_ms")


def interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear through sorted (xs, ys); linear extrapolation past the ends."""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass(frozen=True)
class ProfileCost:
    prefill: tuple[tuple[int, float], ...]  # (batched tokens, seconds), sorted
    decode: tuple[tuple[int, tuple[tuple[int, float], ...]], ...]  # (context, ((num seqs, seconds), ...)), sorted

    def __post_init__(self) -> None:
        if not self.prefill or not self.decode:
            raise ValueError("a profile needs at least one prefill row and one decode row")

    @classmethod
    def from_rows(cls, rows: list[dict]) -> ProfileCost:
        prefill: dict[int, float] = {}
        decode: dict[int, dict[int, float]] = {}
        for row in rows:
            seconds = float(row["step_ms"]) / 1e3
            if row["phase"] == "prefill":
                prefill[int(row["num_tokens"])] = seconds
            elif row["phase"] == "decode":
                decode.setdefault(int(row["context_tokens"]), {})[int(row["num_seqs"])] = seconds
            else:
                raise ValueError(f"unknown phase {row['phase']!r} in a profile row")
        return cls(tuple(sorted(prefill.items())),
                   tuple((c, tuple(sorted(by_batch.items()))) for c, by_batch in sorted(decode.items())))

    @classmethod
    def from_csv(cls, path: str | Path) -> ProfileCost:
        with Path(path).open(newline="") as f:
            return cls.from_rows(list(csv.DictReader(f)))

    def prefill_s(self, num_tokens: float) -> float:
        xs, ys = zip(*self.prefill, strict=True)
        return max(min(ys), interpolate(list(xs), list(ys), num_tokens))

    def decode_s(self, num_seqs: float, mean_context: float) -> float:
        contexts = [c for c, _ in self.decode]
        at = []
        for _, table in self.decode:
            xs, ys = zip(*table, strict=True)
            at.append(max(min(ys), interpolate(list(xs), list(ys), num_seqs)))
        return max(min(at), interpolate(contexts, at, mean_context))

    @property
    def attention_s_per_token_pair(self) -> float:
        """b of the prefill rows' a * n + b * n^2, through the two longest rows (0 with one row, never below 0)."""
        if len(self.prefill) < 2:
            return 0.0
        (n1, t1), (n2, t2) = self.prefill[-2], self.prefill[-1]
        return max(0.0, (t2 / n2 - t1 / n1) / (n2 - n1))

    def step_time_s(self, batch: ScheduledBatch) -> float:
        num_decode = context = num_tokens = cached_pairs = 0
        for item in batch.items:
            num_tokens += item.num_tokens
            if item.phase == "decode":
                num_decode += 1
                context += item.start + 1
            else:
                cached_pairs += item.num_tokens * item.start  # a chunk's queries against its earlier tokens
        if num_decode == len(batch.items):
            return self.decode_s(num_decode, context / num_decode)
        prefill_s = self.prefill_s(num_tokens) + 2 * self.attention_s_per_token_pair * cached_pairs
        if num_decode == 0:
            return prefill_s
        # One forward pass over all the step's tokens (the prefill rows, decode tokens counted in), plus what
        # the decodes' attention over their contexts adds: their decode time beyond the shortest profiled context.
        # Never less than the decodes alone.
        decode_s = self.decode_s(num_decode, context / num_decode)
        attention_s = max(0.0, decode_s - self.decode_s(num_decode, self.decode[0][0]))
        return max(prefill_s + attention_s, decode_s)
