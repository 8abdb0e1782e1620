"""A simulated instance: the real scheduler and block manager, stepped on a simulated clock.

Each instance is one SimPy process running the engine's loop with the model
replaced by a cost model:

    batch = scheduler.schedule()
    yield env.timeout(cost.step_time_s(batch))
    scheduler.update(batch, sampled, env.now)

`sampled` gives every sampling item the same fake token id. Instances that
share a GPU (`gpu`, pdlab/sim/gpus.py) take turns (time-sliced) or share its
throughput (MPS) instead of stepping for `step_time_s` each. Simulated requests
carry no EOS ids and run to `max_tokens`, as benchmark requests do with
`ignore_eos`. An instance with nothing to schedule sleeps on an event that
`notify` fires when work arrives (a new request, a landed transfer, freed
blocks), so idle time costs no events.

Roles, as in `pdlab/cluster/`:
- `SimInstance` ("mixed"): colocated serving, requests go in with `add`.
- `PrefillInstance`: runs each decode instance's task with `max_tokens=1` and
  `keep_blocks_after_finish`, pushes the KV over its `Link` (overlap model in
  `links.py`), then hands the first token to the decode instance and frees
  its blocks (`release`), as `prefill.py` does on `KVAck`.
- `DecodeInstance`: the entry point: `add_remote` -> `reserve` -> dispatch to a
  prefill picked by the cluster's dispatch policy -> `complete_transfer`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import simpy

from pdlab.policy.block_manager import BlockManager
from pdlab.policy.request import Request
from pdlab.policy.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from pdlab.sim.cost import CostModel
from pdlab.sim.gpus import MpsGpu, TimeSlicedGpu
from pdlab.sim.links import Link

# Every simulated step samples this id; no simulated request has EOS ids or stop ids.
FAKE_TOKEN_ID = 0


@dataclass(frozen=True)
class InstanceSpec:
    """One instance's scheduler limits and KV cache size (as the engine would size them)."""

    scheduler: SchedulerConfig
    num_blocks: int
    block_size: int = 16
    cost: CostModel | None = None  # None: the cost model given to `simulate`


class SimInstance:
    role = "mixed"

    def __init__(self, env: simpy.Environment, name: str, spec: InstanceSpec, cost: CostModel | None) -> None:
        self.env = env
        self.name = name
        self.cost = spec.cost or cost
        if self.cost is None:
            raise ValueError(f"{name}: no cost model (give one to simulate, or set InstanceSpec.cost)")
        self.block_manager = BlockManager(spec.num_blocks, spec.block_size)
        self.scheduler = Scheduler(spec.scheduler, self.block_manager)
        self.finished: list[Request] = []  # requests that ended here, in finishing order
        self.num_steps = 0
        self.busy_s = 0.0
        # Test and tracing hooks: called before each `schedule`, and with each non-empty batch.
        self.before_schedule: Callable[[SimInstance], None] | None = None
        self.on_batch: Callable[[ScheduledBatch], None] | None = None
        self._wake: simpy.Event | None = None
        # The GPU this instance shares with others (pdlab/sim/gpus.py; None: its own), and its SM limit there.
        self.gpu: TimeSlicedGpu | MpsGpu | None = None
        self.sm_share = 1.0
        self.process = env.process(self.run())

    @property
    def load(self) -> int:
        """Unfinished requests here: what the dispatch policies compare."""
        return len(self.scheduler.requests)

    def add(self, request: Request) -> None:
        self.scheduler.add(request)
        self.notify()

    def notify(self) -> None:
        """Something changed that may let `schedule` return work: wake the loop if it sleeps."""
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    def run(self):
        env, scheduler = self.env, self.scheduler
        while True:
            if self.before_schedule is not None:
                self.before_schedule(self)
            batch = scheduler.schedule() if scheduler.has_work() else None
            if batch is None or not batch.items:
                self._wake = env.event()
                yield self._wake
                self._wake = None
                continue
            if self.on_batch is not None:
                self.on_batch(batch)
            step_s = self.cost.step_time_s(batch)
            if self.gpu is None:
                self.start_step(batch)
                yield env.timeout(step_s)
            else:
                yield from self.gpu.run_step(step_s, self.sm_share, lambda: self.start_step(batch), batch.kind)
            self.num_steps += 1
            self.busy_s += step_s
            sampled = {item.request.request_id: FAKE_TOKEN_ID for item in batch.items if item.sample}
            touched = scheduler.update(batch, sampled, env.now)
            self.end_step([r for r in touched if r.is_finished])

    def start_step(self, batch: ScheduledBatch) -> None:
        """The step's compute starts now (a prefill instance starts its KV pushes)."""

    def end_step(self, finished: list[Request]) -> None:
        self.finished.extend(finished)


@dataclass
class PrefillJob:
    request_id: str
    decode: DecodeInstance
    transfers: list[simpy.Event] = field(default_factory=list)  # one per computed chunk, on the link
    last_chunk_bytes: float = 0.0


class PrefillInstance(SimInstance):
    role = "prefill"

    def __init__(self, env: simpy.Environment, name: str, spec: InstanceSpec, cost: CostModel | None, link: Link,
                 kv_bytes_per_token: float, num_layers: int) -> None:
        super().__init__(env, name, spec, cost)
        self.link = link
        self.kv_bytes_per_token = kv_bytes_per_token
        self.num_layers = num_layers
        self.tasks: dict[str, PrefillJob] = {}  # dispatched here, KV not yet delivered
        self.num_tasks = 0  # tasks ever dispatched here
        self.num_task_tokens = 0  # their known tokens (what FastDeploy's prefill load counts)

    @property
    def outstanding(self) -> int:
        return len(self.tasks)

    def add_task(self, request: Request, decode: DecodeInstance) -> None:
        """Compute `request`'s prompt (the decode side's object is not touched) for `decode`."""
        local = Request(request.request_id, request.prompt_token_ids, replace(request.params, max_tokens=1),
                        arrival_time_s=request.arrival_time_s, keep_blocks_after_finish=True)
        self.tasks[request.request_id] = PrefillJob(request.request_id, decode)
        self.num_tasks += 1
        self.num_task_tokens += request.num_tokens
        self.add(local)

    def start_step(self, batch: ScheduledBatch) -> None:
        # Each chunk's KV goes out layer by layer while the step computes it (a recomputed
        # chunk, after a preemption here, is sent again, as the real prefill does).
        for item in batch.items:
            task = self.tasks[item.request.request_id]
            task.last_chunk_bytes = item.num_tokens * self.kv_bytes_per_token
            task.transfers.append(self.link.transfer(task.last_chunk_bytes))

    def end_step(self, finished: list[Request]) -> None:
        spec = self.link.spec
        for request in finished:
            task = self.tasks[request.request_id]
            # The last layer of the last chunk is written at the end of the step and still has to cross the link.
            tail_s = spec.latency_s + task.last_chunk_bytes / self.num_layers / spec.bandwidth_bytes_per_s
            if tail_s == 0 and all(t.triggered for t in task.transfers):
                self._deliver_now(task)
            else:
                self.env.process(self._deliver(task, tail_s))

    def _deliver(self, task: PrefillJob, tail_s: float):
        if tail_s > 0:
            yield self.env.timeout(tail_s)
        for transfer in task.transfers:
            if not transfer.processed:
                yield transfer
        self._deliver_now(task)

    def _deliver_now(self, task: PrefillJob) -> None:
        del self.tasks[task.request_id]
        task.decode.receive(task.request_id)
        self.scheduler.release(task.request_id)
        self.notify()


class DecodeInstance(SimInstance):
    role = "decode"

    def __init__(self, env: simpy.Environment, name: str, spec: InstanceSpec, cost: CostModel | None,
                 dispatch: Callable[[Request, DecodeInstance], None]) -> None:
        super().__init__(env, name, spec, cost)
        self.dispatch = dispatch  # sends a reserved request's prefill task to some prefill instance

    def add_remote(self, request: Request) -> None:
        self.scheduler.add_remote(request)
        self.reserve_and_dispatch()

    def reserve_and_dispatch(self) -> None:
        for request in self.scheduler.reserve():
            self.dispatch(request, self)

    def receive(self, request_id: str) -> None:
        """The prompt's KV and first token have landed: join the running batch."""
        request = self.scheduler.complete_transfer(request_id, FAKE_TOKEN_ID, self.env.now)
        if request is not None and request.is_finished:  # max_tokens == 1
            self.end_step([request])
        self.notify()

    def end_step(self, finished: list[Request]) -> None:
        super().end_step(finished)
        if finished:  # freed blocks and slots may admit queued remote requests
            self.reserve_and_dispatch()
