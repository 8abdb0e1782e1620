"""A simulated deployment: its instances, its KV links, and the routing in front of them.

A disaggregated request's life is one SimPy process, `_disaggregated`, that
reads as the story `pdlab/cluster/decode.py` and `prefill.py` tell:
1. a decode instance queues it for blocks for its prompt's KV and reserves
   them when they are free (admission control, in arrival order);
2. a prefill instance computes the prompt, pushing each chunk's KV over the
   link as it goes;
3. the rest of the KV crosses the link;
4. the decode instance takes it and the first token into its running batch,
   and the prefill instance frees its blocks.
The instances' own processes step their batches; the request's process waits
on the hand-offs they fire (`handoff.py`). Requests are admitted one at a
time, in arrival order, each before the next is routed.

Two routings, as in `pdlab/cluster/` (`Layout.routing`):

`"innode"`, FastDeploy's single-machine mode. Colocated: each arriving
request goes to the mixed instance the dispatch policy picks by load
(unfinished requests). Disaggregated (xPyD): each arriving request goes to a
decode instance picked the same way; once that instance has reserved its
blocks, the prefill task goes to a prefill instance picked by the same policy
class over the prefills' outstanding tasks, as `pdlab/cluster/decode.py` does
with `LeastLoaded`. Here every decode instance sees every prefill's true
outstanding count; the real single-machine decode counts only its own tasks,
which is the same thing with one decode instance. Default policy:
`least_loaded`.

`"splitwise"`, FastDeploy's Redis mode: a router (`router.py`) picks the
prefill AND the decode instance at arrival with `select_pd` over FastDeploy's
loads (prompt tokens in flight on a prefill, requests on a decode) and
near-tie widths, optionally through heartbeats `heartbeat_s` apart; the
decode instance reserves blocks as before, then sends the task to the prefill
the router chose. Colocated, the router picks a mixed instance by its tokens
in flight. Default policy: `fastdeploy` (random among the near-least loaded).

GPUs: `gpu_of` places the instances; those on one GPU share its throughput, one GPU's
worth in all when time-sliced (`gpu_sharing="time"`), `mps_capacity` under CUDA MPS
(`"mps"`, each capped by its `sm_share`): pdlab/sim/gpus.py.

Links: with `link_scope="per_prefill"` each prefill instance has its own
egress link (its NVLink port or NIC), shared by its concurrent transfers;
`"shared"` puts every transfer on one link (a single cross-node bottleneck).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Literal

import simpy

from pdlab.policy.dispatch import POLICIES, make_policy
from pdlab.policy.request import Request
from pdlab.sim.cost import CostModel
from pdlab.sim.gpus import MpsGpu, TimeSlicedGpu
from pdlab.sim.handoff import Handoff
from pdlab.sim.instance import DecodeInstance, InstanceSpec, PrefillInstance, SimInstance
from pdlab.sim.links import LINKS, Link, LinkSpec
from pdlab.sim.router import SplitwiseRouter

Mode = Literal["colocated", "disaggregated"]
Routing = Literal["innode", "splitwise"]
DEFAULT_DISPATCH: dict[str, str] = {"innode": "least_loaded", "splitwise": "fastdeploy"}


@dataclass(frozen=True)
class Layout:
    """What runs where. `instance` is every mixed and prefill instance; `decode_instance` (default: the same) every decode one."""

    instance: InstanceSpec
    mode: Mode = "colocated"
    num_instances: int = 1  # colocated
    num_prefill: int = 1  # disaggregated
    num_decode: int = 1  # disaggregated
    decode_instance: InstanceSpec | None = None
    link: LinkSpec = LINKS["nvlink"]
    link_scope: Literal["per_prefill", "shared"] = "per_prefill"
    kv_bytes_per_token: float = 0.0  # the prompt KV one transfer moves per token (the model's, across its TP ranks)
    num_layers: int = 1  # the transfer's layer-wise tail is one layer's share
    routing: Routing = "innode"
    dispatch: str | None = None  # a name in pdlab.policy.dispatch.POLICIES; None: the routing's default
    heartbeat_s: float = 0.0  # splitwise: loads reach the router in heartbeats this far apart (0: at once)
    # The GPU of each instance, in start order (prefills, then decodes; or the mixed ones), when some share one:
    # they share it (time-sliced, as separate processes on one GPU without MPS, or MPS). None: each its own.
    gpu_of: tuple[int, ...] | None = None
    gpu_sharing: Literal["time", "mps"] = "time"
    sm_share: tuple[float, ...] | None = None  # mps: each instance's SM limit (start order); None: no limits
    mps_capacity: float = 1.0  # mps: how many whole GPUs' worth of work concurrent steps do together (gpus.py)

    def __post_init__(self) -> None:
        if self.routing not in DEFAULT_DISPATCH:
            raise ValueError(f"unknown routing {self.routing!r}; choose from {', '.join(DEFAULT_DISPATCH)}")
        if self.dispatch is None:
            object.__setattr__(self, "dispatch", DEFAULT_DISPATCH[self.routing])
        if self.dispatch not in POLICIES:
            raise ValueError(f"unknown dispatch policy {self.dispatch!r}; choose from {sorted(POLICIES)}")
        if self.heartbeat_s < 0 or (self.heartbeat_s > 0 and self.routing != "splitwise"):
            raise ValueError(f"heartbeat_s must be >= 0, and > 0 only with routing='splitwise'; got {self.heartbeat_s}")
        counts = (self.num_instances,) if self.mode == "colocated" else (self.num_prefill, self.num_decode)
        if min(counts) < 1 or self.num_layers < 1 or self.kv_bytes_per_token < 0:
            raise ValueError(f"bad layout: {self}")
        if self.gpu_of is not None and len(self.gpu_of) != self.num_total_instances:
            raise ValueError(f"gpu_of names {len(self.gpu_of)} GPUs for {self.num_total_instances} instances")
        if self.sm_share is not None and (len(self.sm_share) != self.num_total_instances
                                          or not all(0 < x <= 1 for x in self.sm_share)):
            raise ValueError(f"sm_share needs one share in (0, 1] per instance, got {self.sm_share}")
        if self.gpu_sharing not in ("time", "mps"):
            raise ValueError(f"unknown gpu_sharing {self.gpu_sharing!r}; choose time or mps")

    @property
    def num_total_instances(self) -> int:
        return self.num_instances if self.mode == "colocated" else self.num_prefill + self.num_decode


class SimCluster:
    def __init__(self, env: simpy.Environment, layout: Layout, cost: CostModel | None, seed: int = 0) -> None:
        self.env = env
        self.layout = layout
        self.links: list[Link] = []
        self.prefills: list[PrefillInstance] = []
        self._prefill_of: dict[str, PrefillInstance] = {}  # splitwise: the router's choice, until the task is sent
        if layout.mode == "colocated":
            self.entries: list[SimInstance] = [
                SimInstance(env, f"mixed-{i}", layout.instance, cost) for i in range(layout.num_instances)]
        else:
            shared = Link(env, layout.link, "link") if layout.link_scope == "shared" else None
            for i in range(layout.num_prefill):
                link = shared or Link(env, layout.link, f"link-{i}")
                if link not in self.links:
                    self.links.append(link)
                self.prefills.append(PrefillInstance(env, f"prefill-{i}", layout.instance, cost, link,
                                                     layout.kv_bytes_per_token, layout.num_layers))
            decode_spec = layout.decode_instance or layout.instance
            self.entries = [DecodeInstance(env, f"decode-{i}", decode_spec, cost) for i in range(layout.num_decode)]
        if layout.gpu_of is not None:
            def shared():
                return TimeSlicedGpu(env) if layout.gpu_sharing == "time" else MpsGpu(env, layout.mps_capacity)

            gpus = {g: shared() for g in set(layout.gpu_of) if layout.gpu_of.count(g) > 1}
            for instance, g in zip(self.instances, layout.gpu_of, strict=True):
                instance.gpu = gpus.get(g)
        for instance, share in zip(self.instances, layout.sm_share or (), strict=False):
            instance.sm_share = share
        # Each policy draws from its own stream of the run's seed.
        self.router: SplitwiseRouter | None = None
        if layout.routing == "splitwise":
            self.router = SplitwiseRouter(env, self.instances, layout.dispatch, seed, layout.heartbeat_s)
        else:
            self.entry_policy = make_policy(layout.dispatch, seed)
            self.prefill_policy = make_policy(layout.dispatch, seed + 1)

    @property
    def instances(self) -> list[SimInstance]:
        return [*self.prefills, *self.entries]

    def submit(self, request: Request) -> Handoff:
        """A request arrives now. The event fires once it is admitted (routed and queued where it runs; the
        caller waits on it before the next request arrives), or fails with ValueError, having changed nothing,
        for a request no instance takes (too long for the model, or a duplicate id)."""
        admitted = Handoff(self.env)
        if self.layout.mode == "colocated":
            try:
                self._admit_colocated(request)
            except ValueError as e:
                return admitted.fail(e)
            return admitted.succeed()
        self.env.process(self._disaggregated(request, admitted))
        return admitted

    def _disaggregated(self, request: Request, admitted: Handoff) -> Generator:
        """One disaggregated request, from its arrival to its first token in a decode instance's batch."""
        # 1. Admission: a decode instance queues it for blocks for the prompt's KV, and reserves them in order.
        try:
            decode, reserved = self._admit_disaggregated(request)
        except ValueError as e:
            admitted.fail(e)
            return
        admitted.succeed()
        yield reserved
        # 2. Prefill: a prefill instance computes the prompt, pushing each chunk's KV over its link.
        prefill = self._prefill_for(request)
        job = prefill.add_task(request)
        yield job.computed
        # 3. Transfer: the rest of the KV crosses the link.
        yield from prefill.deliver(job)
        # 4. Decode: the request joins the running batch with its first token; the prefill frees its blocks.
        yield from decode.join(request.request_id)
        prefill.release(job)

    def _admit_colocated(self, request: Request) -> None:
        if self.router is not None:
            target = self.entries[self.router.select_mixed(self.entries, request.num_tokens)]
        else:
            target = self._pick_entry()
        target.add(request)
        if self.router is not None:
            self.router.sent(target, request.num_tokens)

    def _admit_disaggregated(self, request: Request) -> tuple[DecodeInstance, Handoff]:
        """The decode instance that takes `request`, and the event of its blocks reserved there."""
        if self.router is None:
            decode = self._pick_entry()
            return decode, decode.reserve(request)
        router, num_tokens = self.router, request.num_tokens
        p, d = router.select_pd(self.prefills, self.entries, num_tokens)
        prefill, decode = self.prefills[p], self.entries[d]
        self._prefill_of[request.request_id] = prefill
        try:
            reserved = decode.reserve(request)
        except ValueError:
            del self._prefill_of[request.request_id]
            raise
        router.sent(prefill, num_tokens)
        router.sent(decode, 1)
        return decode, reserved

    def _pick_entry(self) -> SimInstance:
        if len(self.entries) == 1:
            return self.entries[0]
        return self.entries[self.entry_policy.pick([e.load for e in self.entries])]

    def _prefill_for(self, request: Request) -> PrefillInstance:
        """Where a request with reserved blocks sends its prefill task: where the router said (splitwise), else
        where the dispatch policy picks now."""
        if self.router is not None:
            return self._prefill_of.pop(request.request_id)
        return self.prefills[self.prefill_policy.pick([p.outstanding for p in self.prefills])]

    def close(self) -> None:
        """No more requests will arrive (stops the splitwise heartbeats, which would otherwise tick forever)."""
        if self.router is not None:
            self.router.close()

    def finished(self) -> list[Request]:
        return [r for e in self.entries for r in e.finished]
