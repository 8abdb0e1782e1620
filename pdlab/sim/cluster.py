"""A simulated deployment: its instances, its KV links, and the dispatcher in front of them.

Colocated: `num_instances` mixed instances; each arriving request goes to the
one the dispatch policy picks by load (unfinished requests).

Disaggregated (xPyD): each arriving request goes to a decode instance picked
the same way; that decode instance reserves blocks for the prompt (admission
control, in order) and then sends the prefill task to a prefill instance
picked by the same policy class over the prefills' outstanding tasks, as
`pdlab/cluster/decode.py` does with `LeastLoaded`. Here every decode instance
sees every prefill's true outstanding count (a global scheduler's view, like
FastDeploy's splitwise scheduler); the real single-machine decode counts only
its own tasks, which is the same thing with one decode instance.

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
from pdlab.sim.instance import DecodeInstance, InstanceSpec, PrefillInstance, SimInstance
from pdlab.sim.links import LINKS, Link, LinkSpec

Mode = Literal["colocated", "disaggregated"]


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
    dispatch: str = "least_loaded"  # a name in pdlab.policy.dispatch.POLICIES

    def __post_init__(self) -> None:
        if self.dispatch not in POLICIES:
            raise ValueError(f"unknown dispatch policy {self.dispatch!r}; choose from {sorted(POLICIES)}")
        counts = (self.num_instances,) if self.mode == "colocated" else (self.num_prefill, self.num_decode)
        if min(counts) < 1 or self.num_layers < 1 or self.kv_bytes_per_token < 0:
            raise ValueError(f"bad layout: {self}")

    @property
    def num_total_instances(self) -> int:
        return self.num_instances if self.mode == "colocated" else self.num_prefill + self.num_decode


class SimCluster:
    def __init__(self, env: simpy.Environment, layout: Layout, cost: CostModel | None, seed: int = 0) -> None:
        self.env = env
        self.layout = layout
        # Each policy draws from its own stream of the run's seed.
        self.entry_policy = make_policy(layout.dispatch, seed)
        self.prefill_policy = make_policy(layout.dispatch, seed + 1)
        self.links: list[Link] = []
        self.prefills: list[PrefillInstance] = []
        if layout.mode == "colocated":
            self.entries: list[SimInstance] = [
                SimInstance(env, f"mixed-{i}", layout.instance, cost) for i in range(layout.num_instances)]
            return
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

    @property
    def instances(self) -> list[SimInstance]:
        return [*self.prefills, *self.entries]

    def submit(self, request: Request) -> None:
        """A request arrives now: hand it to the entry instance the policy picks."""
        entry = self.entries[self.entry_policy.pick([e.load for e in self.entries])] if len(self.entries) > 1 \
            else self.entries[0]
        if self.layout.mode == "colocated":
            entry.add(request)
        else:
            entry.add_remote(request)

    def dispatch_prefill(self, request: Request, decode: DecodeInstance) -> None:
        loads = [p.outstanding for p in self.prefills]
        self.prefills[self.prefill_policy.pick(loads)].add_task(request, decode)

    def finished(self) -> list[Request]:
        return [r for e in self.entries for r in e.finished]
