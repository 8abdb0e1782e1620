"""Which instance gets a request (standard library only; the cluster layer and the simulator share it).

A policy sees a list of candidate loads (any number where lower is better)
and returns an index. `tolerance` widens "the least loaded" to every
candidate within that much of the minimum (the policies that look at loads
use it; the others ignore it). Every policy is deterministic given its seed.

| name | picks |
|---|---|
| `round_robin` | the next candidate in turn, whatever the loads |
| `least_loaded` | the least loaded; near-ties in turn (round-robin) |
| `power_of_two` | the less loaded of two random candidates |
| `fastdeploy` | a random one among the near-least loaded (FastDeploy's splitwise `select_pd`) |

Loads, as FastDeploy's splitwise scheduler counts them (`instance_load`): a
prefill or mixed instance's load is the prompt tokens of its unfinished
requests, a decode instance's the number of its unfinished requests.
FastDeploy's near-tie widths ("blur steps") are `prefill_tolerance` (in prompt
tokens) and `decode_tolerance` (in requests). `select_pd` picks a prefill and
a decode instance for one request with them.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Protocol


class Policy(Protocol):
    def pick(self, loads: Sequence[float], tolerance: float = 0.0) -> int:
        """Index of the chosen candidate; raises ValueError when `loads` is empty."""
        ...


def _check(loads: Sequence[float]) -> None:
    if not loads:
        raise ValueError("no instance to dispatch to")


def _near_least(loads: Sequence[float], tolerance: float) -> list[int]:
    best = min(loads)
    return [i for i, load in enumerate(loads) if load <= best + tolerance]


class RoundRobin:
    def __init__(self, seed: int = 0) -> None:
        self._next = 0

    def pick(self, loads: Sequence[float], tolerance: float = 0.0) -> int:
        _check(loads)
        index = self._next % len(loads)
        self._next += 1
        return index


class LeastLoaded:
    """The lowest load; among near-ties (within `tolerance` of it), round-robin."""

    def __init__(self, seed: int = 0) -> None:
        self._next = 0

    def pick(self, loads: Sequence[float], tolerance: float = 0.0) -> int:
        _check(loads)
        near = _near_least(loads, tolerance)
        index = near[self._next % len(near)]
        self._next += 1
        return index


class PowerOfTwo:
    """Two random candidates, the less loaded wins (seeded)."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def pick(self, loads: Sequence[float], tolerance: float = 0.0) -> int:
        _check(loads)
        a, b = self._rng.randrange(len(loads)), self._rng.randrange(len(loads))
        return a if loads[a] <= loads[b] else b


class FastDeploy:
    """A random candidate among those within `tolerance` of the least load (seeded).

    Randomising among near-ties keeps routers with slightly stale loads (they
    learn loads from heartbeats) from all sending a burst to the same instance.
    """

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def pick(self, loads: Sequence[float], tolerance: float = 0.0) -> int:
        _check(loads)
        return self._rng.choice(_near_least(loads, tolerance))


POLICIES: dict[str, type] = {"round_robin": RoundRobin, "least_loaded": LeastLoaded, "power_of_two": PowerOfTwo,
                             "fastdeploy": FastDeploy}


def make_policy(name: str, seed: int = 0) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown dispatch policy {name!r}; choose from {', '.join(POLICIES)}")
    return POLICIES[name](seed)


# --- FastDeploy's splitwise selection ---------------------------------------------------------


def prefill_tolerance(num_prompt_tokens: int) -> float:
    """Near-tie width among prefill loads, in prompt tokens: clamp(prompt / rate, 100, 500),
    rate 2 below 1000 prompt tokens and 10 from there (FastDeploy's `blur_step`)."""
    rate = 2 if num_prompt_tokens < 1000 else 10
    return min(max(num_prompt_tokens / rate, 100.0), 500.0)


def decode_tolerance(num_decode: int) -> float:
    """Near-tie width among decode loads, in requests: min(#decode instances, 10)."""
    return float(min(num_decode, 10))


def instance_load(role: str, num_prompt_tokens: Iterable[int]) -> float:
    """An instance's load from the prompt lengths of its unfinished requests (see the module docstring)."""
    if role == "decode":
        return float(sum(1 for _ in num_prompt_tokens))
    return float(sum(num_prompt_tokens))


def select_pd(prefill_policy: Policy, decode_policy: Policy, prefill_loads: Sequence[float],
              decode_loads: Sequence[float], num_prompt_tokens: int) -> tuple[int, int]:
    """(prefill index, decode index) for one request of `num_prompt_tokens`."""
    return (prefill_policy.pick(prefill_loads, prefill_tolerance(num_prompt_tokens)),
            decode_policy.pick(decode_loads, decode_tolerance(len(decode_loads))))
