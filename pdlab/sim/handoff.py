"""Zero-time hand-offs between simulated processes.

A request's process waits on events that instances fire when its turn comes
(`DecodeInstance` reserved its blocks, `PrefillInstance` computed its prompt).
Such a hand-off takes no simulated time, and it must not let anything else that
happens at the same instant run first: a prefill step ending at that instant
would otherwise schedule its next batch without the task just handed to it.
A `Handoff` is therefore processed before every ordinary event of its instant
(SimPy's URGENT priority, that of a process's start), in the order hand-offs
were fired, as the function call it stands for would have been.
"""

from __future__ import annotations

from typing import Any

import simpy
from simpy.events import PENDING, URGENT


class Handoff(simpy.Event):
    def succeed(self, value: Any = None) -> Handoff:
        return self._trigger(True, value)

    def fail(self, exception: Exception) -> Handoff:
        return self._trigger(False, exception)

    def _trigger(self, ok: bool, value: Any) -> Handoff:
        if self._value is not PENDING:
            raise RuntimeError(f"{self} has already been triggered")
        self._ok, self._value = ok, value
        self.env.schedule(self, URGENT)
        return self
