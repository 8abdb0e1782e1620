"""A simulated deployment: its instances, its KV links, and the routing in front of them.

Two routings, as in `pdlab/cluster/` (`Layout.routing`):

`"innode"`, FastDeploy's single-machine mode. Colocated: each arriving
request goes to the mixed instance the dispatch policy picks by load
(unfinished requests). Disaggregated (xPyD): each arriving request goes to a
decode instance picked the same way; that decode instance reserves blocks for
the prompt (admission control, in order) and only then sends the prefill task
to a prefill instance picked by the same policy class over the prefills'
outstanding tasks, as `pdlab/cluster/decode.py` does with `LeastLoaded`. Here
every decode instance sees every prefill's true outstanding count; the real
single-machine decode counts only its own tasks, which is the same thing with
one decode instance. Default policy: `least_loaded`.

`"splitwise"`, FastDeploy's Redis mode: a router (`router.py`) picks the
prefill AND the decode instance at arrival with `select_pd` over FastDeploy's
loads (prompt tokens in flight on a prefill, requests on a decode) and
near-tie widths, optionally through heartbeats `heartbeat_s` apart; the
decode instance reserves blocks as before, then sends the task to the prefill
the router chose. Colocated, the router picks a mixed instance by its tokens
in flight. Default policy: `fastdeploy` (random among the near-least loaded).

GPUs: `gpu_of` places the instances; those on one GPU take turns step by step
(`gpu_sharing="time"`) or run at once and share its throughput under CUDA MPS
(`"mps"`, each capped by its `sm_share`): pdlab/sim/gpus.py.

Links: with `link_scope="per_prefill"` each prefill instance has its own
egress link (its NVLink port or NIC), shared by its concurrent transfers;
`"shared"` puts every transfer on one link (a single cross-node bottleneck).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import simpy

from pdlab.policy.dispatch import POLICIES, make_policy
from pdlab.policy.request import Request
from pdlab.sim.cost import CostModel
from pdlab.sim.gpus import MpsGpu, TimeSlicedGpu
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
    # their steps take turns (time-sliced, as separate processes on one GPU without MPS). None: each its own.
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
        self._prefill_of: dict[str, PrefillInstance] = {}  # splitwise: the router's choice, until dispatched
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
            self.entries = [DecodeInstance(env, f"decode-{i}", decode_spec, cost, self.dispatch_prefill)
                            for i in range(layout.num_decode)]
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

    def submit(self, request: Request) -> None:
        """A request arrives now: route it. Raises ValueError (and changes nothing) for a request no instance takes."""
        if self.router is not None:
            self._route_splitwise(request)
            return
        entry = self.entries[self.entry_policy.pick([e.load for e in self.entries])] if len(self.entries) > 1 \
            else self.entries[0]
        if self.layout.mode == "colocated":
            entry.add(request)
        else:
            entry.add_remote(request)

    def _route_splitwise(self, request: Request) -> None:
        router, num_tokens = self.router, request.num_tokens
        if self.layout.mode == "colocated":
            target = self.entries[router.select_mixed(self.entries, num_tokens)]
            target.add(request)
            router.sent(target, num_tokens)
            return
        p, d = router.select_pd(self.prefills, self.entries, num_tokens)
        prefill, decode = self.prefills[p], self.entries[d]
        self._prefill_of[request.request_id] = prefill
        try:
            decode.add_remote(request)  # may dispatch at once (blocks free), through dispatch_prefill
        except ValueError:
            self._prefill_of.pop(request.request_id, None)
            raise
        router.sent(prefill, num_tokens)
        router.sent(decode, 1)

    def dispatch_prefill(self, request: Request, decode: DecodeInstance) -> None:
        """`decode` has reserved blocks for `request`: send the prefill task (splitwise: where the router said)."""
        if self.router is not None:
            prefill = self._prefill_of.pop(request.request_id)
        else:
            prefill = self.prefills[self.prefill_policy.pick([p.outstanding for p in self.prefills])]
        prefill.add_task(request, decode)

    def close(self) -> None:
        """No more requests will arrive (stops the splitwise heartbeats, which would otherwise tick forever)."""
        if self.router is not None:
            self.router.close()

    def finished(self) -> list[Request]:
        return [r for e in self.entries for r in e.finished]
