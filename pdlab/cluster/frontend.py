"""What every client-facing role (mixed.py, decode.py) does: take `GenerateRequest`s, stream `RequestUpdate`s back."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pdlab.cluster.messages import QUEUE_FULL, AbortRequest, GenerateRequest, RequestUpdate, encode, sampling_from_msg
from pdlab.cluster.roles import Role
from pdlab.cluster.splitwise.wire import Task
from pdlab.cluster.splitwise.wire import encode as encode_json
from pdlab.engine.outputs import RequestOutput
from pdlab.errors import PdlabError
from pdlab.policy.request import Request

if TYPE_CHECKING:
    from pdlab.cluster.instance import Instance

log = logging.getLogger("pdlab.instance")


# Where a request's updates go: its zmq client, or the results list of the router that sent it.
Reply = Callable[[RequestUpdate], None]


class Frontend(Role):
    """Accepts requests (from zmq clients, or as tasks from a splitwise router) and streams their tokens back."""

    def __init__(self, instance: Instance) -> None:
        super().__init__(instance)
        self.replies: dict[str, Reply] = {}  # request id -> where its updates go
        self.num_sent: dict[str, int] = {}  # output tokens the client has already
        self.deadlines: dict[str, float] = {}  # requests from a splitwise router: id -> wall-clock deadline

    def on_ewq(self, identity: bytes, message) -> None:
        if isinstance(message, GenerateRequest):
            self.accept(message.request_id, message.prompt_token_ids, message.sampling, self._zmq_reply(identity))
        elif isinstance(message, AbortRequest):
            self.on_abort(message.request_id)
        else:
            super().on_ewq(identity, message)

    def on_task(self, task: Task) -> None:
        agent = self.instance.agent
        reply = lambda update: agent.push_result(task.reply_to, encode_json(update))  # noqa: E731
        self.accept(task.request_id, task.prompt_token_ids, task.sampling, reply, seed=task.seed,
                    output_token_ids=task.output_token_ids, task=task)
        if task.request_id in self.replies:  # admitted and not already ended
            self.deadlines[task.request_id] = task.deadline_ts

    def accept(self, request_id: str, prompt_token_ids: list[int], sampling, reply: Reply, *, seed: int | None = None,
               output_token_ids: list[int] = (), task: Task | None = None) -> bool:
        """Validate a request and admit it; a bad one gets an error update. Returns whether it was admitted."""
        if request_id in self.replies:
            reply(RequestUpdate(request_id, [], True, "error", f"request id {request_id!r} is already in use"))
            return False
        try:
            params = sampling_from_msg(sampling)
            request = self.engine.make_request(prompt_token_ids, params, request_id, seed=seed,
                                               output_token_ids=output_token_ids)
        except PdlabError as e:
            reply(RequestUpdate(request_id, [], True, "error", str(e), len(prompt_token_ids)))
            return False
        max_waiting = self.instance.args.max_waiting_requests
        if self.num_queued() >= max_waiting:
            self.metrics.on_refused("queue_full")
            reply(RequestUpdate(request_id, [], True, "error",
                                f"{QUEUE_FULL}: {max_waiting} requests are waiting on {self.instance.instance_id} "
                                f"(--max-waiting-requests); try again later", len(prompt_token_ids)))
            return False
        self.replies[request_id] = reply
        self.num_sent[request_id] = request.num_output_tokens
        self.admit(request, task)
        return True

    def admit(self, request: Request, task: Task | None) -> None:
        """Queue a validated request (colocated: here; decode: after a remote prefill)."""
        raise NotImplementedError

    def num_queued(self) -> int:
        """Requests admitted but not started: waiting for the batch, or (decode) for KV blocks."""
        return self.scheduler.num_waiting + len(self.scheduler.reserving)

    def on_abort(self, request_id: str) -> None:
        out = self.engine.abort(request_id)
        if out is not None:
            self.publish(out)

    def fail(self, request_id: str, error: str, retry: bool = False) -> None:
        """End an unfinished request with an error and tell its client."""
        request = self.scheduler.finish(request_id, "error", self.engine.clock())
        if request is not None:
            out = self.engine.output(request)
            out.error = error
            self.publish(out, error, retry)

    def on_scheduler_restarted(self) -> None:
        # The routers of these requests send them again (their updates may be lost): stop serving these attempts.
        for request_id in list(self.deadlines):
            self.fail(request_id, "the splitwise scheduler's Redis restarted", retry=True)

    def tick(self, now_s: float) -> None:
        if not self.deadlines:
            return
        agent = self.instance.agent
        lost_s = agent.down_for_s()
        if lost_s > agent.config.expire_s:  # the routers gave up on these; nobody would get their tokens
            for request_id in list(self.deadlines):
                self.fail(request_id, f"lost the splitwise scheduler's Redis for {lost_s:.1f} s")
            return
        now_ts = time.time()
        for request_id, deadline_ts in list(self.deadlines.items()):
            if now_ts > deadline_ts:
                self.fail(request_id, f"the request expired: not finished within --scheduler-ttl "
                                      f"{agent.config.ttl_s:g} s")

    def publish(self, out: RequestOutput, error: str | None = None, retry: bool = False) -> None:
        """Stream the tokens the client has not seen yet; on the last update, the text too."""
        reply = self.replies.get(out.request_id)
        if reply is None:
            return
        sent = self.num_sent[out.request_id]
        new = out.token_ids[sent:]
        if not new and not out.finished:
            return
        self.num_sent[out.request_id] = len(out.token_ids)
        self.metrics.on_output(out, len(new))
        # Log-probabilities exist for the tokens sampled here (not for those a resumed request came with).
        logprobs = out.logprobs[len(out.logprobs) - len(new):] if out.logprobs is not None and new else None
        reply(RequestUpdate(
            out.request_id, new, out.finished, out.finish_reason, error or out.error, len(out.prompt_token_ids),
            out.text if out.finished else None, logprobs, retry,
        ))
        if out.finished:
            del self.replies[out.request_id], self.num_sent[out.request_id]
            self.deadlines.pop(out.request_id, None)

    def _zmq_reply(self, identity: bytes) -> Reply:
        ewq = self.instance.ewq
        return lambda update: ewq.send_multipart([identity, encode(update)])
