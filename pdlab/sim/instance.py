"""A simulated instance: the real scheduler and block manager, stepped on a simulated clock.

Each instance is one SimPy process running the engine's loop with the model
replaced by a cost model:

    batch = scheduler.schedule()
    yield env.timeout(cost.step_time_s(batch))
    scheduler.update(batch, sampled, env.now)

`sampled` gives every sampling item the same fake token id. Instances that
share a GPU (`gpu`, pdlab/sim/gpus.py) share its throughput instead of stepping
for `step_time_s` each; the host's part of a step leaves the GPU to the others. Simulated requests
carry no EOS ids and run to `max_tokens`, as benchmark requests do with
`ignore_eos`. An instance with nothing to schedule sleeps on an event that
`notify` fires when work arrives (a new request, a landed transfer, freed
blocks), so idle time costs no events.

Roles, as in `pdlab/cluster/`. A disaggregated request's life is one process
(`SimCluster._disaggregated`); the instances below are what it waits on:
- `SimInstance` ("mixed"): colocated serving, requests go in with `add`.
- `DecodeInstance`: `reserve` queues a request for blocks for its prompt's KV
  and returns the event its process waits on; `join` puts it in the running
  batch once its KV and first token have landed.
- `PrefillInstance`: `add_task` computes a prompt with `max_tokens=1` and
  `keep_blocks_after_finish`, pushing each chunk's KV over its `Link` as the
  step computing it starts (overlap model in `links.py`); `deliver` waits
  for the rest of it; `release` frees the blocks, as `prefill.py` does on
  `KVAck`. A prompt whose KV has all landed when its last step ends is
  handed over before the next step is scheduled, so its blocks are free for
  that step.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace

import simpy

from pdlab.policy.block_manager import BlockManager
from pdlab.policy.request import Request
from pdlab.policy.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from pdlab.sim.cost import CostModel
from pdlab.sim.gpus import SharedGpu
from pdlab.sim.handoff import Handoff
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
    # The engine's async scheduling (a colocated instance's; see SimInstance.run).
    async_scheduling: bool = False


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
        self.async_scheduling = spec.async_scheduling and self.role == "mixed"
        self._arrived: list[Request] | None = None  # async scheduling: the requests that arrived during a step
        self.num_steps = 0
        self.busy_s = 0.0
        # Test and tracing hooks: called before each `schedule`, and with each non-empty batch.
        self.before_schedule: Callable[[SimInstance], None] | None = None
        self.on_batch: Callable[[ScheduledBatch], None] | None = None
        self._wake: simpy.Event | None = None
        # The GPU this instance shares with others (pdlab/sim/gpus.py; None: its own), and its SM limit there.
        self.gpu: SharedGpu | None = None
        self.sm_share = 1.0
        self.process = env.process(self.run())

    @property
    def load(self) -> int:
        """Unfinished requests here: what the dispatch policies compare."""
        return len(self.scheduler.requests) + len(self._arrived or ())

    def add(self, request: Request) -> None:
        if self._arrived is not None:
            self._arrived.append(request)  # joins after the next step is planned (see `run`)
            return
        self.scheduler.add(request)
        self.notify()

    def notify(self) -> None:
        """Something changed that may let `schedule` return work: wake the loop if it sleeps."""
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    def run(self):
        """Step while there is work. With async scheduling (a colocated instance), as the engine does: the
        next step is planned while this one runs (`Scheduler.schedule_after`, before this step's update),
        so a request that arrives during step n starts in step n + 2 at the earliest; the served overhead's
        part that the GPU's work hides is the calibration's (a table measured on an async run)."""
        env, scheduler = self.env, self.scheduler
        ahead = None
        while True:
            if self.before_schedule is not None:
                self.before_schedule(self)
            batch = ahead if ahead is not None else scheduler.schedule() if scheduler.has_work() else None
            ahead = None
            if batch is None or not batch.items:
                self._wake = env.event()
                yield self._wake
                self._wake = None
                continue
            if self.on_batch is not None:
                self.on_batch(batch)
            step_s = self.cost.step_time_s(batch)
            if self.async_scheduling:
                self._arrived = []
            if self.gpu is None:
                self.start_step(batch)
                yield env.timeout(step_s)
            else:  # the host's part of the step leaves the GPU to the instances that share it
                host_s = self.cost.host_time_s(batch) if hasattr(self.cost, "host_time_s") else 0.0
                yield from self.gpu.run_step(step_s - host_s, self.sm_share, lambda: self.start_step(batch),
                                             batch.kind)
                if host_s:
                    yield env.timeout(host_s)
            self.num_steps += 1
            self.busy_s += step_s
            if self.async_scheduling:
                ahead = scheduler.schedule_after(batch)
                arrived, self._arrived = self._arrived, None
                for request in arrived:
                    scheduler.add(request)
            sampled = {item.request.request_id: FAKE_TOKEN_ID for item in batch.items if item.sample}
            touched = scheduler.update(batch, sampled, env.now)
            finished = [r for r in touched if r.is_finished]
            if finished:
                yield from self.end_step(finished)

    def start_step(self, batch: ScheduledBatch) -> None:
        """The step's compute starts now (a prefill instance starts its KV pushes)."""

    def end_step(self, finished: list[Request]) -> Generator:
        """`finished` ended in the step that just ended; the loop schedules the next step when this returns."""
        self.finished.extend(finished)
        yield from ()


@dataclass
class PrefillJob:
    """A prompt computed here for a decode instance, until its KV has crossed the link and its blocks are free."""

    request_id: str
    computed: Handoff  # fires when the step computing the last chunk ends
    transfers: list[simpy.Event] = field(default_factory=list)  # one per computed chunk, on the link
    last_chunk_bytes: float = 0.0
    tail_s: float = 0.0  # after the last step: the link's latency and the last chunk's last layer
    landed: bool = False  # all of the KV had crossed when the last step ended
    released: Handoff | None = None  # fires on `release`, when the loop waits for it (`landed`)


class PrefillInstance(SimInstance):
    role = "prefill"

    def __init__(self, env: simpy.Environment, name: str, spec: InstanceSpec, cost: CostModel | None, link: Link,
                 kv_bytes_per_token: float, num_layers: int) -> None:
        super().__init__(env, name, spec, cost)
        self.link = link
        self.kv_bytes_per_token = kv_bytes_per_token
        self.num_layers = num_layers
        self.tasks: dict[str, PrefillJob] = {}  # added here, KV not yet delivered
        self.num_tasks = 0  # tasks ever added here
        self.num_task_tokens = 0  # their known tokens (what FastDeploy's prefill load counts)

    @property
    def outstanding(self) -> int:
        return len(self.tasks)

    def add_task(self, request: Request) -> PrefillJob:
        """Compute `request`'s prompt (the decode side's object is not touched); wait on the job's `computed`."""
        local = Request(request.request_id, request.prompt_token_ids, replace(request.params, max_tokens=1),
                        arrival_time_s=request.arrival_time_s, keep_blocks_after_finish=True)
        job = self.tasks[request.request_id] = PrefillJob(request.request_id, Handoff(self.env))
        self.num_tasks += 1
        self.num_task_tokens += request.num_tokens
        self.add(local)
        return job

    def start_step(self, batch: ScheduledBatch) -> None:
        # Each chunk's KV goes out layer by layer while the step computes it (a recomputed
        # chunk, after a preemption here, is sent again, as the real prefill does).
        for item in batch.items:
            job = self.tasks[item.request.request_id]
            job.last_chunk_bytes = item.num_tokens * self.kv_bytes_per_token
            job.transfers.append(self.link.transfer(job.last_chunk_bytes))

    def end_step(self, finished: list[Request]) -> Generator:
        spec = self.link.spec
        for request in finished:
            job = self.tasks[request.request_id]
            # The last layer of the last chunk is written at the end of the step and still has to cross the link.
            job.tail_s = spec.latency_s + job.last_chunk_bytes / self.num_layers / spec.bandwidth_bytes_per_s
            job.landed = job.tail_s == 0 and all(t.triggered for t in job.transfers)
            job.computed.succeed()
            if job.landed:  # handed over at once: its blocks come back before the next step is scheduled
                job.released = Handoff(self.env)
                yield job.released

    def deliver(self, job: PrefillJob) -> Generator:
        """Wait (in the request's process) until the last of the job's KV has crossed the link; the task is then
        done here, though its blocks stay taken until `release`."""
        if not job.landed:
            if job.tail_s > 0:
                yield self.env.timeout(job.tail_s)
            for transfer in job.transfers:
                if not transfer.processed:
                    yield transfer
        del self.tasks[job.request_id]

    def release(self, job: PrefillJob) -> None:
        """The decode instance has the KV: free its blocks here."""
        self.scheduler.release(job.request_id)
        self.notify()
        if job.released is not None:
            job.released.succeed()


class DecodeInstance(SimInstance):
    role = "decode"

    def __init__(self, env: simpy.Environment, name: str, spec: InstanceSpec, cost: CostModel | None) -> None:
        super().__init__(env, name, spec, cost)
        self._reserved: dict[str, Handoff] = {}  # queued for blocks: fires when they are reserved

    def reserve(self, request: Request) -> Handoff:
        """Queue `request` for blocks for its prompt's KV; the event fires once they are reserved, in arrival
        order (admission control). Raises ValueError (and queues nothing) for a request too long for the model."""
        self.scheduler.add_remote(request)
        reserved = self._reserved[request.request_id] = Handoff(self.env)
        self._reserve_queued()
        return reserved

    def _reserve_queued(self) -> int:
        reserved = self.scheduler.reserve()
        for request in reserved:
            self._reserved.pop(request.request_id).succeed()
        return len(reserved)

    def join(self, request_id: str) -> Generator:
        """The prompt's KV and first token have landed: join the running batch (in the request's process)."""
        request = self.scheduler.complete_transfer(request_id, FAKE_TOKEN_ID, self.env.now)
        if request is not None and request.is_finished:  # max_tokens == 1
            self.finished.append(request)
            if self._reserve_queued():  # the requests its blocks admit send their prefill tasks first
                yield Handoff(self.env).succeed()
        self.notify()

    def end_step(self, finished: list[Request]) -> Generator:
        yield from super().end_step(finished)
        self._reserve_queued()  # freed blocks and slots may admit queued remote requests
