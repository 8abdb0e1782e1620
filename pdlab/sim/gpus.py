"""GPUs that several simulated instances share: time-sliced, or side by side under CUDA MPS.

An instance on its own GPU steps for its cost model's step time. Instances on one GPU share it by
processor sharing (`SharedGpu`): a step's work is its time on the whole GPU alone; while several steps
run, a `capacity` of whole-GPU speed is split evenly among them, none faster than its own cap, and what
one cannot use goes to the others (water-filling). Only a step's GPU part is shared: the host's part of a
served step (`ServedCost.host_time_s`) leaves the GPU to the others (pdlab/sim/instance.py).
- Time-sliced (separate processes, no MPS; `TimeSlicedGpu`): the driver switches contexts every few
  milliseconds, far more often than a step of tens of milliseconds ends, so contending steps progress
  together at one GPU's speed in all (capacity 1, no caps). Modelled instead as whole steps taking turns,
  the one-GPU runs' TTFT p50 came out 43-87% low (a prefill step ran alone once it had the GPU, where the
  real one was stretched by the decode's slices); as processor sharing, with the host's part off the GPU,
  within 3-41% (median 21%) and TPOT p50 within 2-38% (median 10%).
- CUDA MPS (`MpsGpu`): kernels of both run at once; `capacity` above 1 stands for steps that need different
  parts of the GPU (a compute-bound prefill beside a bandwidth-bound decode) and overlap. Two compute-bound
  matmuls under MPS measured on an H100 did 0.90-0.96 of one alone. 1.2 gave the one-GPU MPS runs their
  smallest median error (TTFT p50 18%, TPOT p50 24%; tried 1.0, 1.1, 1.2, 1.4 on all of them: in-sample).
  Each step is capped by its instance's SM limit (`sm_speed`).

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


@dataclass
class _Step:
    remaining_s: float  # work left, in seconds of the whole GPU
    max_rate: float  # sm_speed of its instance's limit
    done: simpy.Event
    rate: float = 0.0


class SharedGpu:
    def __init__(self, env: simpy.Environment, capacity: float = 1.0, sm_limits: bool = True) -> None:
        if capacity < 1:
            raise ValueError(f"a shared GPU's capacity is at least one GPU's, got {capacity}")
        self.env = env
        self.capacity = capacity
        self.sm_limits = sm_limits  # whether an instance's SM share caps its steps (MPS) or means nothing
        self.steps: list[_Step] = []
        self._since = env.now
        self._generation = 0  # bumped whenever the rates change; an older wake-up is stale

    def run_step(self, step_s: float, sm_share: float, start: Callable[[], None], kind: str = "prefill") -> Generator:
        """Start at once and compute `step_s` of whole-GPU work (a batch of `kind`), sharing the GPU with the
        steps running."""
        start()
        self._advance()
        step = _Step(step_s, sm_speed(sm_share, kind) if self.sm_limits else 1.0, self.env.event())
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


def TimeSlicedGpu(env: simpy.Environment) -> SharedGpu:  # noqa: N802 - a kind of GPU, as MpsGpu
    """Processes time-sliced by the driver: one GPU's speed in all, SM limits mean nothing."""
    return SharedGpu(env, capacity=1.0, sm_limits=False)


def MpsGpu(env: simpy.Environment, capacity: float = 1.0) -> SharedGpu:  # noqa: N802
    """Processes side by side under CUDA MPS: `capacity` GPUs' worth together, each capped by its SM limit."""
    return SharedGpu(env, capacity, sm_limits=True)
