"""GPUs that several simulated instances share: time-sliced, or side by side under CUDA MPS.

An instance on its own GPU steps for its cost model's step time. Instances on one GPU:
- `TimeSlicedGpu` (separate processes, no MPS): they take turns, one step at a time; a step waits for the
  steps already on the GPU to end.
- `MpsGpu` (CUDA MPS): their steps run at once and share the GPU (processor sharing). A step's work is its
  time on the whole GPU alone; while several steps run, a `capacity` of whole-GPU speed is split evenly
  among them, none faster than its instance's SM limit allows (`sm_speed`), and what one cannot use goes to
  the others (water-filling). `capacity` 1: two steps together do no more than one alone, as two
  compute-bound matmuls under MPS measured on an H100 (0.90-0.96 of one); steps that need different parts
  of the GPU (a compute-bound prefill beside a bandwidth-bound decode) overlap better, which a capacity
  above 1 stands for.

How fast a step runs under an SM limit depends on what bounds it (`sm_speed`), fitted to the engine's own
steps profiled under MPS on an H100 (`python -m pdlab.profiler --sm-percentage`, llama3-8b bf16;
data/profiles/mps/): at 40% of the SMs, prefills of 1-4k tokens took 1.81-1.89x their time alone
(share ** 0.7 gives 1.90x), while decode steps (batch 1-64, context 512-2k) took 0.94-1.07x: reading
weights and KV from HBM, they run at full speed on 40% of the SMs.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

import simpy

SM_EXPONENT = 0.7  # a compute-bound step's speed under an SM limit: share ** SM_EXPONENT
DECODE_FULL_SPEED_SHARE = 0.4  # a decode step runs at full speed on this share of the SMs


def sm_speed(share: float, kind: str = "prefill") -> float:
    """How fast a step of `kind` ('decode': bandwidth-bound; anything else: compute-bound) runs alone
    under an SM limit of `share` (0, 1], relative to the whole GPU."""
    if not 0 < share <= 1:
        raise ValueError(f"an SM share must be in (0, 1], got {share}")
    if kind == "decode":
        return min(1.0, share / DECODE_FULL_SPEED_SHARE) ** SM_EXPONENT
    return share ** SM_EXPONENT


class TimeSlicedGpu:
    def __init__(self, env: simpy.Environment) -> None:
        self.env = env
        self._turn = simpy.Resource(env, capacity=1)

    def run_step(self, step_s: float, sm_share: float, start: Callable[[], None], kind: str = "prefill") -> Generator:
        """Wait for this GPU, call `start`, compute for `step_s` (an SM limit means nothing time-sliced)."""
        with self._turn.request() as turn:
            yield turn
            start()
            yield self.env.timeout(step_s)


@dataclass
class _Step:
    remaining_s: float  # work left, in seconds of the whole GPU
    max_rate: float  # sm_speed of its instance's limit
    done: simpy.Event
    rate: float = 0.0


class MpsGpu:
    def __init__(self, env: simpy.Environment, capacity: float = 1.0) -> None:
        if capacity < 1:
            raise ValueError(f"an MPS GPU's capacity is at least one GPU's, got {capacity}")
        self.env = env
        self.capacity = capacity
        self.steps: list[_Step] = []
        self._since = env.now
        self._generation = 0  # bumped whenever the rates change; an older wake-up is stale

    def run_step(self, step_s: float, sm_share: float, start: Callable[[], None], kind: str = "prefill") -> Generator:
        """Start at once and compute `step_s` of whole-GPU work (a batch of `kind`), sharing the GPU with the
        steps running."""
        start()
        self._advance()
        step = _Step(step_s, sm_speed(sm_share, kind), self.env.event())
        self.steps.append(step)
        self._reschedule()
        yield step.done

    def _advance(self) -> None:
        elapsed = self.env.now - self._since
        for step in self.steps:
            step.remaining_s -= step.rate * elapsed
        self._since = self.env.now

    def _reschedule(self) -> None:
        left = self.capacity
        by_cap = sorted(self.steps, key=lambda s: s.max_rate)
        for i, step in enumerate(by_cap):  # water-filling: an even split, capped, the rest to the others
            step.rate = min(step.max_rate, left / (len(by_cap) - i))
            left -= step.rate
        self._generation += 1
        if self.steps:
            next_s = min(max(0.0, s.remaining_s) / s.rate for s in self.steps)
            self.env.process(self._finish_after(next_s, self._generation))

    def _finish_after(self, delay_s: float, generation: int) -> Generator:
        yield self.env.timeout(delay_s)
        if generation != self._generation:
            return
        self._advance()
        done = [s for s in self.steps if s.remaining_s <= 1e-12 + 1e-9 * s.rate]
        for step in done:
            self.steps.remove(step)
            step.done.succeed()
        self._reschedule()
