"""How many tokens a prompt or an output has: distributions with one verb.

`sample(num, rng) -> lengths` returns [N] int64 token counts, each at least 1
and within the distribution's bounds. Continuous draws are rounded to the
nearest integer and then clipped to [min_tokens, max_tokens], so a cap piles
the tail onto the cap rather than redrawing it (what Vidur does with trace
lengths past a model's context).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from pdlab.errors import ConfigError

# The standard normal quantile at 0.9: p90 = median * exp(Z90 * sigma) for a lognormal.
Z90 = 1.2815515655446004


class LengthDistribution(Protocol):
    def sample(self, num: int, rng: np.random.Generator) -> np.ndarray:
        """Return `num` token counts ([N] int64, each >= 1), drawing only from `rng`."""
        ...

    @property
    def max_value(self) -> int | None:
        """The largest count `sample` can return, or None when unbounded."""
        ...


def _check_bounds(min_tokens: int, max_tokens: int | None) -> None:
    if min_tokens < 1:
        raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
    if max_tokens is not None and max_tokens < min_tokens:
        raise ValueError(f"max_tokens ({max_tokens}) must be >= min_tokens ({min_tokens})")


def _round_and_clip(values: np.ndarray, min_tokens: int, max_tokens: int | None) -> np.ndarray:
    # Clip in float first: a huge lognormal draw must not overflow int64.
    upper = np.inf if max_tokens is None else max_tokens
    return np.clip(np.rint(values), min_tokens, upper).astype(np.int64)


@dataclass(frozen=True)
class FixedLength:
    tokens: int

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {self.tokens}")

    def sample(self, num: int, rng: np.random.Generator) -> np.ndarray:
        return np.full(num, self.tokens, dtype=np.int64)

    @property
    def max_value(self) -> int:
        return self.tokens


@dataclass(frozen=True)
class UniformLength:
    """Integers uniform on [min_tokens, max_tokens], both ends included."""

    min_tokens: int
    max_tokens: int

    def __post_init__(self) -> None:
        _check_bounds(self.min_tokens, self.max_tokens)

    def sample(self, num: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(self.min_tokens, self.max_tokens + 1, size=num, dtype=np.int64)

    @property
    def max_value(self) -> int:
        return self.max_tokens


@dataclass(frozen=True)
class LognormalLength:
    """exp(Normal(ln median_tokens, sigma)), rounded and clipped.

    Build it from the numbers one usually knows with `from_mean` or `from_p90`.
    The mean of the unclipped distribution is median * exp(sigma**2 / 2).
    """

    median_tokens: float
    sigma: float
    min_tokens: int = 1
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.median_tokens > 0:
            raise ValueError(f"median_tokens must be > 0, got {self.median_tokens}")
        if not self.sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        _check_bounds(self.min_tokens, self.max_tokens)

    @classmethod
    def from_mean(
        cls, mean_tokens: float, sigma: float, min_tokens: int = 1, max_tokens: int | None = None
    ) -> LognormalLength:
        return cls(mean_tokens / math.exp(sigma**2 / 2), sigma, min_tokens, max_tokens)

    @classmethod
    def from_p90(
        cls, median_tokens: float, p90_tokens: float, min_tokens: int = 1, max_tokens: int | None = None
    ) -> LognormalLength:
        if not p90_tokens >= median_tokens > 0:
            raise ValueError(f"need p90_tokens ({p90_tokens}) >= median_tokens ({median_tokens}) > 0")
        return cls(median_tokens, math.log(p90_tokens / median_tokens) / Z90, min_tokens, max_tokens)

    @property
    def mean_tokens(self) -> float:
        """Mean before rounding and clipping."""
        return self.median_tokens * math.exp(self.sigma**2 / 2)

    def sample(self, num: int, rng: np.random.Generator) -> np.ndarray:
        draws = rng.lognormal(math.log(self.median_tokens), self.sigma, size=num)
        return _round_and_clip(draws, self.min_tokens, self.max_tokens)

    @property
    def max_value(self) -> int | None:
        return self.max_tokens


@dataclass(frozen=True)
class EmpiricalLength:
    """Lengths taken from observed values (a trace column), clipped to the bounds.

    By default each draw picks a value uniformly with replacement. With
    `replay=True` the first `num` values are returned in order and `rng` is not
    used: together with `TraceArrivals` that replays a trace's rows as they were,
    keeping each row's prompt and output lengths together.
    """

    values: tuple[int, ...] = field(repr=False)
    replay: bool = False
    min_tokens: int = 1
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("values must not be empty")
        _check_bounds(self.min_tokens, self.max_tokens)

    def sample(self, num: int, rng: np.random.Generator | None = None) -> np.ndarray:
        values = np.asarray(self.values, dtype=np.float64)
        if self.replay:
            if num > len(values):
                raise ConfigError(f"the trace has {len(values)} rows, fewer than the {num} requests asked for")
            picked = values[:num]
        else:
            picked = values[rng.integers(0, len(values), size=num)]
        return _round_and_clip(picked, self.min_tokens, self.max_tokens)

    @property
    def max_value(self) -> int:
        top = int(max(self.values))
        return max(self.min_tokens, top if self.max_tokens is None else min(top, self.max_tokens))
