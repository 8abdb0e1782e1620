"""When requests arrive: seconds from the start of a run, one per request, sorted.

Every process has the same verb, `sample(num_requests, rng) -> times_s` ([N]
float64, first arrival at 0.0, non-decreasing). The first request is sent at
once and each later one after a drawn gap, as vLLM's serving benchmark does, so
a run never opens with idle time. Each caller passes its own
`numpy.random.Generator`: the arrival stream shares no state with the length or
token streams, so changing a length distribution leaves the arrival times as
they were.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from pdlab.errors import ConfigError


class ArrivalProcess(Protocol):
    def sample(self, num_requests: int, rng: np.random.Generator) -> np.ndarray:
        """Return `num_requests` arrival times in seconds ([N] float64, sorted, first 0.0).

        Draws only from `rng`; the same generator state gives the same times.
        """
        ...


def _times_from_gaps(gaps_s: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(gaps_s)])


def _check(num_requests: int, rate_rps: float | None = None) -> None:
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if rate_rps is not None and not rate_rps > 0:
        raise ValueError(f"rate_rps must be > 0, got {rate_rps}")


@dataclass(frozen=True)
class PoissonArrivals:
    """Exponential gaps with mean 1/rate_rps (a gamma process with cv = 1)."""

    rate_rps: float

    def sample(self, num_requests: int, rng: np.random.Generator) -> np.ndarray:
        _check(num_requests, self.rate_rps)
        if num_requests == 0:
            return np.zeros(0)
        return _times_from_gaps(rng.exponential(1.0 / self.rate_rps, size=num_requests - 1))


@dataclass(frozen=True)
class GammaArrivals:
    """Gamma gaps with mean 1/rate_rps and coefficient of variation `cv`.

    cv = 1 is Poisson; cv > 1 is burstier, cv < 1 more regular. This is vLLM's
    `--burstiness` (shape = 1/cv**2) and the cv of DistServe and Vidur.
    """

    rate_rps: float
    cv: float = 1.0

    def __post_init__(self) -> None:
        if not self.cv > 0:
            raise ValueError(f"cv must be > 0, got {self.cv}")

    def sample(self, num_requests: int, rng: np.random.Generator) -> np.ndarray:
        _check(num_requests, self.rate_rps)
        if num_requests == 0:
            return np.zeros(0)
        shape = 1.0 / self.cv**2
        scale = 1.0 / (self.rate_rps * shape)
        return _times_from_gaps(rng.gamma(shape, scale, size=num_requests - 1))


@dataclass(frozen=True)
class ConstantArrivals:
    """One request every 1/rate_rps seconds exactly."""

    rate_rps: float

    def sample(self, num_requests: int, rng: np.random.Generator) -> np.ndarray:
        _check(num_requests, self.rate_rps)
        return np.arange(num_requests, dtype=np.float64) / self.rate_rps


@dataclass(frozen=True)
class BurstArrivals:
    """Every request at time 0 (an offline batch; vLLM's infinite request rate)."""

    def sample(self, num_requests: int, rng: np.random.Generator) -> np.ndarray:
        _check(num_requests)
        return np.zeros(num_requests)


@dataclass(frozen=True)
class TraceArrivals:
    """The first `num_requests` arrivals of a trace, in order, shifted to start at 0.

    With `rate_rps`, the window is stretched or squeezed in time so that its
    mean rate, (N - 1) / span, is exactly `rate_rps`; the shape of the gaps (the
    trace's burstiness) is kept. Without it, the trace's own times are used.
    Nothing is random: `rng` is accepted for the common interface and unused.
    """

    times_s: tuple[float, ...] = field(repr=False)
    rate_rps: float | None = None

    def sample(self, num_requests: int, rng: np.random.Generator | None = None) -> np.ndarray:
        _check(num_requests, self.rate_rps)
        if num_requests > len(self.times_s):
            raise ConfigError(
                f"the trace has {len(self.times_s)} arrivals, fewer than the {num_requests} requests asked for"
            )
        times = np.sort(np.asarray(self.times_s, dtype=np.float64))[:num_requests]
        if num_requests == 0:
            return times
        times -= times[0]
        span_s = times[-1]
        if self.rate_rps is None or span_s == 0:
            return times
        return times * ((num_requests - 1) / span_s / self.rate_rps)
