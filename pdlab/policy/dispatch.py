"""Which instance gets a request (standard library only; the cluster layer and the simulator share it).

A policy sees a list of candidate loads (outstanding requests, or any number
where lower is better) and returns an index. Ties are broken by a round-robin
cursor, so equal loads spread evenly and a seeded run is deterministic.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def pick(self, loads: Sequence[float]) -> int:
        if not loads:
            raise ValueError("no instance to dispatch to")
        index = self._next % len(loads)
        self._next += 1
        return index


class LeastLoaded:
    """The lowest load; among near-ties (within `tolerance` of it), round-robin."""

    def __init__(self, tolerance: float = 0.0) -> None:
        self.tolerance = tolerance
        self._next = 0

    def pick(self, loads: Sequence[float]) -> int:
        if not loads:
            raise ValueError("no instance to dispatch to")
        best = min(loads)
        near = [i for i, load in enumerate(loads) if load <= best + self.tolerance]
        index = near[self._next % len(near)]
        self._next += 1
        return index


class PowerOfTwo:
    """Two random candidates, the less loaded wins (seeded)."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def pick(self, loads: Sequence[float]) -> int:
        if not loads:
            raise ValueError("no instance to dispatch to")
        a, b = self._rng.randrange(len(loads)), self._rng.randrange(len(loads))
        return a if loads[a] <= loads[b] else b


POLICIES = {"round_robin": RoundRobin, "least_loaded": LeastLoaded, "power_of_two": PowerOfTwo}
