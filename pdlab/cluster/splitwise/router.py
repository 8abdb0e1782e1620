"""The router: requests that enter this instance, served wherever the splitwise scheduler sends them.

Every `GenerateRequest` a client sends to this instance's engine-worker-queue
port (whatever the instance's role) becomes a `Route`. The router validates
it with the local engine (so a bad request fails here, with the engine's own
message), picks a decode and a prefill instance, or a mixed one, from the live
nodes with the shared dispatch policy, and pushes a `Task` to the decode
(mixed) instance's inbox. Updates come back on this node's results list and
go to the client as they are.

A route is sent elsewhere (a new attempt, with the tokens it already has)
when the instance serving it stops heartbeating, when its prefill instance
does before the first token, or when the serving instance reports that it
lost a peer (`RequestUpdate.retry`). Updates of older attempts are ignored.
A route ends with an error after `MAX_ATTEMPTS`, at its deadline
(`--scheduler-ttl` after arrival), or when Redis has been unreachable for
longer than `--scheduler-expire-s` (nothing could reach it any more).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from pdlab.cluster.messages import AbortRequest, GenerateRequest, RequestUpdate, SamplingMsg, encode, sampling_from_msg
from pdlab.cluster.splitwise.agent import RedisAgent, SplitwiseConfig
from pdlab.cluster.splitwise.wire import NodeInfo, Task, TaskAbort
from pdlab.cluster.splitwise.wire import encode as encode_json
from pdlab.errors import PdlabError
from pdlab.policy.dispatch import make_policy, prefill_tolerance, select_pd

if TYPE_CHECKING:
    from pdlab.cluster.instance import Instance

log = logging.getLogger("pdlab.splitwise")

MAX_ATTEMPTS = 4
EXPIRY_GRACE_S = 1.0  # past its deadline, a route waits this long for the serving instance's own error


def pair_protocol(prefill: NodeInfo, decode: NodeInfo) -> str:
    """ipc on one host when both offer it; rdma when both offer it; tcp, which always works, otherwise."""
    common = [p for p in decode.protocols if p in prefill.protocols]
    if prefill.host == decode.host and "ipc" in common:
        return "ipc"
    return "rdma" if "rdma" in common else "tcp"


@dataclass
class Route:
    identity: bytes  # the client's zmq identity
    request_id: str  # the client's id
    prompt_token_ids: list[int]
    sampling: SamplingMsg
    seed: int
    deadline_ts: float
    output_token_ids: list[int] = field(default_factory=list)  # streamed to the client so far
    attempt: int = 0
    wire_id: str = ""  # the id the serving instances know it by: "{request_id}#{attempt}"
    node_id: str = ""  # the decode or mixed instance serving the current attempt ("": none yet)
    prefill_id: str = ""
    avoid: set[str] = field(default_factory=set)  # nodes that failed it
    unrouted_since_s: float | None = None  # no instance could take it (yet)


class Router:
    def __init__(self, instance: Instance, agent: RedisAgent, config: SplitwiseConfig, seed: int = 0) -> None:
        self.instance = instance
        self.agent = agent
        self.config = config
        self.routes: dict[str, Route] = {}  # by wire id
        self.by_client: dict[str, Route] = {}  # by the client's request id
        self.prefill_policy = make_policy(config.dispatch, seed)
        self.decode_policy = make_policy(config.dispatch, seed + 1)
        self.mixed_policy = make_policy(config.dispatch, seed + 2)
        # Load this router added to a node since the heartbeat it last saw (heartbeats lag behind bursts).
        self._added: dict[str, tuple[float, float]] = {}  # node id -> (that heartbeat's ts, load added)
        self.num_redispatched = 0

    # --- from the client ---------------------------------------------------------------------

    def on_generate(self, identity: bytes, message: GenerateRequest) -> None:
        engine = self.instance.engine
        if message.request_id in self.by_client:
            self._reply(identity, RequestUpdate(message.request_id, [], True, "error",
                                                f"request id {message.request_id!r} is already in use"))
            return
        try:
            params = sampling_from_msg(message.sampling)
            request = engine.make_request(message.prompt_token_ids, params, f"route:{message.request_id}")
        except PdlabError as e:
            self._reply(identity, RequestUpdate(message.request_id, [], True, "error", str(e),
                                                len(message.prompt_token_ids)))
            return
        route = Route(identity, message.request_id, list(message.prompt_token_ids), message.sampling, request.seed,
                      time.time() + self.config.ttl_s)
        self.by_client[route.request_id] = route
        self._dispatch(route)

    def on_abort(self, message: AbortRequest) -> None:
        route = self.by_client.get(message.request_id)
        if route is None:
            return
        self._abort_attempt(route)
        self._finish(route, RequestUpdate(route.request_id, [], True, "abort", None, len(route.prompt_token_ids)))

    # --- from the serving instances -------------------------------------------------------------

    def on_update(self, update: RequestUpdate) -> None:
        route = self.routes.get(update.request_id)
        if route is None:  # an older attempt, or a route that ended
            return
        route.output_token_ids.extend(update.new_token_ids)
        if update.finished and update.retry and route.attempt < MAX_ATTEMPTS:
            if update.new_token_ids:
                self._reply(route.identity, RequestUpdate(route.request_id, list(update.new_token_ids),
                                                          num_prompt_tokens=len(route.prompt_token_ids),
                                                          logprobs=update.logprobs))
            if route.prefill_id and not route.output_token_ids:
                route.avoid.add(route.prefill_id)
            self._redispatch(route, f"{route.node_id}: {update.error}")
            return
        out = msgspec.structs.replace(update, request_id=route.request_id, retry=False)
        if update.finished:
            self._finish(route, out)
        else:
            self._reply(route.identity, out)

    def on_scheduler_restarted(self) -> None:
        """Redis came back empty: tasks still in an inbox and updates still in this node's results list
        are gone. Send every dispatched request again, with the tokens its client has, once the instances
        are back in the view (a serving instance that still has the old attempt drops it)."""
        routes = [route for route in self.by_client.values() if route.node_id]
        if routes:
            log.warning("%s: re-dispatching %d request(s): the splitwise scheduler's Redis restarted",
                        self.agent.node_id, len(routes))
        for route in routes:
            self._abort_attempt(route)
            self.routes.pop(route.wire_id, None)  # updates of this attempt may be lost: ignore the rest
            route.node_id = route.prefill_id = ""
            route.unrouted_since_s = time.monotonic()  # `tick` sends it when Redis and the instances are back
            self.num_redispatched += 1

    # --- the loop --------------------------------------------------------------------------------

    def tick(self, now_s: float) -> None:
        down_s = self.agent.down_for_s()
        if down_s > self.config.expire_s:
            for route in list(self.by_client.values()):
                self._fail(route, f"lost the splitwise scheduler's Redis at {self.config.address} "
                                  f"for {down_s:.1f} s")
            return
        now_ts = time.time()
        live = self.agent.live_nodes() if down_s == 0 else None
        for route in list(self.by_client.values()):
            if route.unrouted_since_s is not None:
                if live is not None:
                    self._dispatch(route)
            elif now_ts > route.deadline_ts + EXPIRY_GRACE_S:
                self._abort_attempt(route)
                self._fail(route, f"the request expired: not finished within --scheduler-ttl "
                                  f"{self.config.ttl_s:g} s")
            elif live is not None and route.node_id and self._gone(route.node_id, live):
                route.avoid.add(route.node_id)
                self._redispatch(route, f"{route.node_id} stopped heartbeating")
            elif (live is not None and route.prefill_id and not route.output_token_ids
                  and self._gone(route.prefill_id, live)):
                route.avoid.add(route.prefill_id)
                self._abort_attempt(route)
                self._redispatch(route, f"its prefill instance {route.prefill_id} stopped heartbeating")

    # --- helpers ---------------------------------------------------------------------------------

    def _gone(self, node_id: str, live: dict[str, NodeInfo]) -> bool:
        """Not in the view, and no heartbeat of it for `expire_s` (a Redis that restarted empty lists
        nobody until each node heartbeats again: absence alone proves nothing)."""
        return node_id not in live and self.agent.silent_for_s(node_id) > self.config.expire_s

    def _redispatch(self, route: Route, why: str) -> None:
        if route.attempt >= MAX_ATTEMPTS:
            self._fail(route, f"gave up after {route.attempt} attempts; the last failed: {why}")
            return
        log.warning("%s: re-dispatching %s (attempt %d, %d tokens so far): %s", self.agent.node_id,
                    route.request_id, route.attempt + 1, len(route.output_token_ids), why)
        self.num_redispatched += 1
        self._dispatch(route)

    def _dispatch(self, route: Route) -> None:
        if self.agent.down_for_s() > 0:
            self._fail(route, f"the splitwise scheduler's Redis at {self.config.address} is unreachable")
            return
        nodes = sorted((n for n in self.agent.live_nodes().values() if n.node_id not in route.avoid),
                       key=lambda n: n.node_id)
        num_tokens = len(route.prompt_token_ids) + len(route.output_token_ids)
        prefills = [n for n in nodes if n.role == "prefill"]
        decodes = [n for n in nodes if n.role == "decode"]
        mixed = [n for n in nodes if n.role == "mixed"]
        if prefills and decodes:
            p, d = select_pd(self.prefill_policy, self.decode_policy, [self._load(n) for n in prefills],
                             [self._load(n) for n in decodes], num_tokens)
            target, prefill = decodes[d], prefills[p]
            self._add_load(prefill, num_tokens)
            self._add_load(target, 1)
        elif mixed:
            target = mixed[self.mixed_policy.pick([self._load(n) for n in mixed], prefill_tolerance(num_tokens))]
            prefill = None
            self._add_load(target, num_tokens)
        else:
            # Wait a while: an instance may be starting, or the view may be a heartbeat behind.
            now_s = time.monotonic()
            if route.unrouted_since_s is None:
                route.unrouted_since_s = now_s
            elif now_s - route.unrouted_since_s > self.config.expire_s:
                self._fail(route, f"no instance can serve it: for {self.config.expire_s:g} s the splitwise scheduler "
                                  f"at {self.config.address} knew {len(prefills)} prefill, {len(decodes)} decode and "
                                  f"{len(mixed)} mixed live instances (of topic {self.config.topic!r}) it could use; "
                                  f"it needs a prefill and a decode instance, or a mixed one")
            return
        route.unrouted_since_s = None
        self.routes.pop(route.wire_id, None)
        route.attempt += 1
        route.wire_id = f"{route.request_id}#{route.attempt}"
        route.node_id = target.node_id
        route.prefill_id = prefill.node_id if prefill else ""
        task = Task(route.wire_id, route.prompt_token_ids, route.sampling, route.seed, self.agent.node_id,
                    route.deadline_ts, list(route.output_token_ids), route.prefill_id,
                    prefill.task_endpoint if prefill else "", pair_protocol(prefill, target) if prefill else "")
        self.routes[route.wire_id] = route
        self.agent.push_task(target.node_id, encode_json(task))

    def _load(self, node: NodeInfo) -> float:
        seen_ts, added = self._added.get(node.node_id, (node.ts, 0.0))
        return node.load + (added if seen_ts == node.ts else 0.0)

    def _add_load(self, node: NodeInfo, load: float) -> None:
        seen_ts, added = self._added.get(node.node_id, (node.ts, 0.0))
        self._added[node.node_id] = (node.ts, (added if seen_ts == node.ts else 0.0) + load)

    def _abort_attempt(self, route: Route) -> None:
        if route.node_id:
            self.agent.push_task(route.node_id, encode_json(TaskAbort(route.wire_id)))

    def _fail(self, route: Route, error: str) -> None:
        log.warning("%s: %s failed: %s", self.agent.node_id, route.request_id, error)
        self._finish(route, RequestUpdate(route.request_id, [], True, "error", error, len(route.prompt_token_ids)))

    def _finish(self, route: Route, update: RequestUpdate) -> None:
        self.routes.pop(route.wire_id, None)
        self.by_client.pop(route.request_id, None)
        self._reply(route.identity, update)

    def _reply(self, identity: bytes, update: RequestUpdate) -> None:
        self.instance.ewq.send_multipart([identity, encode(update)])
