"""Several entry points as one engine: each request goes to the least loaded (the shared dispatch policy).

A layout with several colocated instances, or several decode instances, has
several entry points; a client in front of them (here, `pdlab.run`'s replay)
sends each new request to the one with the fewest unfinished requests, ties
in turn (`pdlab.policy.dispatch.LeastLoaded`), as a load balancer would.
"""

from __future__ import annotations

from collections.abc import Sequence

import zmq

from pdlab.engine.outputs import RequestOutput
from pdlab.policy.dispatch import make_policy
from pdlab.sampling_params import SamplingParams


class Balanced:
    """The replay's engine interface over several `RemoteEngine`s (pdlab.cluster.client)."""

    def __init__(self, engines: Sequence, policy: str = "least_loaded", seed: int = 0, poll_s: float = 0.002) -> None:
        if not engines:
            raise ValueError("no entry point to balance over")
        self.engines = list(engines)
        self.clock = self.engines[0].clock
        self.policy = make_policy(policy, seed)
        self.num_sent = [0] * len(self.engines)
        # One wait over every entry point's socket, then each reads what came without waiting: an
        # update is timestamped when it arrives, whichever engine it is for.
        self.poll_s = poll_s
        self.poller = zmq.Poller()
        for engine in self.engines:
            engine.poll_s = 0.0
            self.poller.register(engine.client.sock, zmq.POLLIN)

    def add_request(self, prompt: list[int], params: SamplingParams, request_id: str | None = None,
                    arrival_time_s: float | None = None) -> str:
        i = self.policy.pick([len(e.pending) for e in self.engines])
        self.num_sent[i] += 1
        return self.engines[i].add_request(prompt, params, request_id, arrival_time_s)

    def has_unfinished(self) -> bool:
        return any(e.has_unfinished() for e in self.engines)

    def step(self) -> list[RequestOutput]:
        self.poller.poll(int(self.poll_s * 1000))
        outs: list[RequestOutput] = []
        for engine in self.engines:
            if engine.has_unfinished():
                outs += engine.step()
        return outs

    def close(self) -> None:
        for engine in self.engines:
            engine.close()
