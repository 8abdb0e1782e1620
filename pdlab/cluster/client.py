"""Talk to an instance's engine-worker-queue port: submit requests, receive their tokens.

`RemoteEngine` gives a running instance (mixed, or a disaggregated pair's decode
entry point) the engine interface that `pdlab.loadgen.replay` drives, with
every timestamp taken here, at the client, so that colocated and disaggregated
runs are measured at the same point.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import zmq

from pdlab.cluster.auth import cluster_token, seal
from pdlab.cluster.messages import (
    AbortRequest, GenerateRequest, MessageError, Ping, Pong, RequestUpdate, WeightsOffer, WeightsRequest, decode, encode,
    sampling_to_msg,
)
from pdlab.engine.outputs import RequestOutput
from pdlab.sampling_params import SamplingParams


class Client:
    def __init__(self, endpoint: str, context: zmq.Context | None = None, token: bytes | None = None) -> None:
        """`token`: the cluster token (default $PDLAB_CLUSTER_TOKEN, see `pdlab.cluster.auth`)."""
        self.endpoint = endpoint
        self.token = token if token is not None else cluster_token()
        self._ctx = context or zmq.Context.instance()
        self.sock = self._ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.send(GenerateRequest(request_id, list(prompt_token_ids), sampling_to_msg(params)))

    def abort(self, request_id: str) -> None:
        self.send(AbortRequest(request_id))

    def send(self, message) -> None:
        self.sock.send_multipart(seal(self.token, [encode(message)]))

    def recv(self, timeout_s: float = 0.0) -> list[RequestUpdate]:
        """Updates that arrived within `timeout_s` (all that are queued, once the first one is in)."""
        updates = []
        if not self.sock.poll(int(timeout_s * 1000)):
            return updates
        while True:
            try:
                data = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return updates
            try:
                message = decode(data)
            except MessageError:
                continue
            if isinstance(message, RequestUpdate):
                updates.append(message)

    def close(self) -> None:
        self.sock.close(linger=0)


def ask(endpoint: str, message, reply_type: type, timeout_s: float, context: zmq.Context | None = None,
        token: bytes | None = None, resend_s: float | None = None):
    """Send `message` to an instance's port and wait up to `timeout_s` for a reply of `reply_type` (anything else
    that arrives is skipped); None if none came. With `resend_s`, send again on a fresh connection every
    `resend_s` seconds (a message sent before the instance bound its port is lost).
    `token`: the cluster token (default $PDLAB_CLUSTER_TOKEN)."""
    ctx = context or zmq.Context.instance()
    token = token if token is not None else cluster_token()
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(endpoint)
            sock.send_multipart(seal(token, [encode(message)]))
            attempt_end = time.monotonic() + min(left, resend_s or left)
            while (wait := attempt_end - time.monotonic()) > 0:
                if not sock.poll(int(wait * 1000) + 1):
                    break
                try:
                    reply = decode(sock.recv())
                except MessageError:
                    continue
                if isinstance(reply, reply_type):
                    return reply
        finally:
            sock.close(linger=0)
        if resend_s is None:
            return None
    return None


def ping(endpoint: str, timeout_s: float = 1.0, context: zmq.Context | None = None, token: bytes | None = None
         ) -> Pong | None:
    """The instance's `Pong` (its load and free blocks), or None if it does not answer in time."""
    return ask(endpoint, Ping(), Pong, timeout_s, context, token)


def fetch_weights(endpoint: str, timeout_s: float, token: bytes | None = None) -> WeightsOffer | None:
    """Ask the instance at `endpoint` how to map its weights, waiting up to `timeout_s` for it to come up
    (it answers once its model has loaded); None if it never answered."""
    return ask(endpoint, WeightsRequest(), WeightsOffer, timeout_s, token=token, resend_s=5.0)


class RemoteEngine:
    """The engine interface of `backends.replay`, served by an instance process."""

    def __init__(self, endpoint: str, clock: Callable[[], float] = time.monotonic, poll_s: float = 0.002,
                 liveness_s: float = 30.0, token: bytes | None = None) -> None:
        self.client = Client(endpoint, token=token)
        self.endpoint = endpoint
        self.clock = clock
        self.poll_s = poll_s
        # After this much silence the instance is pinged; no answer within as long again ends every request.
        # (A busy instance answers between two steps; a step of many seconds is possible on a loaded CPU.)
        self.liveness_s = liveness_s
        self.pending: dict[str, RequestOutput] = {}
        self._prefix = uuid.uuid4().hex[:8]
        self._last_heard = time.monotonic()

    def add_request(self, prompt: list[int], params: SamplingParams, request_id: str | None = None,
                    arrival_time_s: float | None = None) -> str:
        request_id = request_id or f"{self._prefix}-{len(self.pending)}"
        arrival = self.clock() if arrival_time_s is None else arrival_time_s
        self.pending[request_id] = RequestOutput(request_id, list(prompt), [], "", False, None, arrival, None)
        self.client.submit(request_id, prompt, params)
        return request_id

    def abort(self, request_id: str) -> None:
        self.client.abort(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.pending)

    def step(self) -> list[RequestOutput]:
        """Wait briefly for updates; return the outputs they advanced."""
        touched = {}
        updates = self.client.recv(self.poll_s)
        if updates or not self.pending:
            self._last_heard = time.monotonic()
        elif time.monotonic() - self._last_heard > self.liveness_s:
            self._last_heard = time.monotonic()
            if ping(self.endpoint, timeout_s=self.liveness_s, token=self.client.token) is None:
                return self._fail_all(f"the instance at {self.endpoint} stopped answering")
        for update in updates:
            out = self.pending.get(update.request_id)
            if out is None:
                continue
            now = self.clock()
            if update.new_token_ids:
                if out.first_token_time_s is None:
                    out.first_token_time_s = now
                out.token_ids.extend(update.new_token_ids)
                out.token_times_s.extend([now] * len(update.new_token_ids))
                if update.logprobs:
                    out.logprobs = (out.logprobs or []) + list(update.logprobs)
            if update.finished:
                out.finished = True
                out.finish_reason = update.finish_reason
                out.finish_time_s = now
                out.error = update.error
                out.text = update.text or ""
                del self.pending[update.request_id]
            touched[update.request_id] = out
        return list(touched.values())

    def _fail_all(self, error: str) -> list[RequestOutput]:
        now = self.clock()
        outs = list(self.pending.values())
        for out in outs:
            out.finished, out.finish_reason, out.finish_time_s, out.error = True, "error", now, error
        self.pending.clear()
        return outs

    def drain(self, timeout_s: float) -> dict[str, RequestOutput]:
        """Step until every submitted request has finished or `timeout_s` passed; the finished outputs by id."""
        done: dict[str, RequestOutput] = {}
        deadline = time.monotonic() + timeout_s
        while self.has_unfinished() and time.monotonic() < deadline:
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
        return done

    def close(self) -> None:
        self.client.close()
