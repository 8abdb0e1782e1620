"""FastDeploy's splitwise routing in the simulator: a router picks both instances of a request when it arrives.

The Redis splitwise mode (`pdlab/cluster/splitwise/router.py`) routes each
request with `pdlab.policy.dispatch.select_pd` over the loads instances
publish in their heartbeats (`instance_load`: a prefill or mixed instance's
load is the tokens of its unfinished requests, a decode instance's the number
of its unfinished requests), with FastDeploy's near-tie widths. The decode
instance then reserves blocks and sends the prefill task to the prefill
instance the router named, whatever has happened to it since.

`SplitwiseRouter` is that router with the very same policy objects, fed by
simulated instances:

- `heartbeat_s == 0`: the router sees every instance's load as it is now.
- `heartbeat_s > 0`: every instance publishes its load at t = 0, heartbeat_s,
  2 heartbeat_s, ... (all in step, so a run stays deterministic); between two
  heartbeats the router sees the last published load plus what it has itself
  sent to the instance since (the real router's `_added`). Loads are thus up
  to `heartbeat_s` stale, and a burst between heartbeats is spread by what the
  router sent, not by what the instances have done with it.

One router stands for every entry point: the real deployment has one per
instance that receives requests, each counting only what it sent itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import simpy

from pdlab.policy.dispatch import instance_load, make_policy, prefill_tolerance, select_pd
from pdlab.sim.instance import SimInstance


def node_load(instance: SimInstance) -> float:
    """What the instance would publish in its heartbeat (as `pdlab.cluster.instance.Instance.node_info` does)."""
    return instance_load(instance.role, (r.num_tokens for r in instance.scheduler.requests.values()))


class SplitwiseRouter:
    def __init__(self, env: simpy.Environment, instances: Sequence[SimInstance], dispatch: str, seed: int = 0,
                 heartbeat_s: float = 0.0) -> None:
        if heartbeat_s < 0:
            raise ValueError(f"heartbeat_s must be >= 0, got {heartbeat_s}")
        self.env = env
        self.heartbeat_s = heartbeat_s
        # The real router's three policies, each on its own stream of the run's seed.
        self.prefill_policy = make_policy(dispatch, seed)
        self.decode_policy = make_policy(dispatch, seed + 1)
        self.mixed_policy = make_policy(dispatch, seed + 2)
        self._published: dict[str, float] = {}  # instance name -> load at the last heartbeat
        self._added: dict[str, float] = {}  # instance name -> load sent there since that heartbeat
        self._closed = False
        self.num_heartbeats = 0
        if heartbeat_s > 0:
            env.process(self._heartbeats(list(instances)))

    def load(self, instance: SimInstance) -> float:
        """The instance's load as the router sees it."""
        if self.heartbeat_s == 0:
            return node_load(instance)
        return self._published.get(instance.name, 0.0) + self._added.get(instance.name, 0.0)

    def select_pd(self, prefills: Sequence[SimInstance], decodes: Sequence[SimInstance],
                  num_tokens: int) -> tuple[int, int]:
        """(prefill index, decode index) for a request of `num_tokens` known tokens."""
        return select_pd(self.prefill_policy, self.decode_policy, [self.load(p) for p in prefills],
                         [self.load(d) for d in decodes], num_tokens)

    def select_mixed(self, mixed: Sequence[SimInstance], num_tokens: int) -> int:
        return self.mixed_policy.pick([self.load(m) for m in mixed], prefill_tolerance(num_tokens))

    def sent(self, instance: SimInstance, load: float) -> None:
        """The router has just sent `load` to `instance` (counted until its next heartbeat)."""
        if self.heartbeat_s > 0:
            self._added[instance.name] = self._added.get(instance.name, 0.0) + load

    def close(self) -> None:
        """No more requests will arrive: stop the heartbeats, so the run can end."""
        self._closed = True

    def _heartbeats(self, instances: list[SimInstance]):
        while not self._closed:
            self._published = {i.name: node_load(i) for i in instances}
            self._added.clear()
            self.num_heartbeats += 1
            yield self.env.timeout(self.heartbeat_s)
