"""What every client-facing role does: take `GenerateRequest`s, stream `RequestUpdate`s back."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pdlab.cluster.messages import AbortRequest, GenerateRequest, RequestUpdate, encode, sampling_from_msg
from pdlab.engine.outputs import RequestOutput
from pdlab.errors import PdlabError
from pdlab.policy.request import Request

if TYPE_CHECKING:
    from pdlab.cluster.instance import Instance

log = logging.getLogger("pdlab.instance")


class Role:
    """The default for every hook: ignore. Roles override what they handle."""

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.engine = instance.engine
        self.scheduler = instance.engine.scheduler
        self.metrics = instance.metrics

    def on_ewq(self, identity: bytes, message) -> None:
        log.warning("%s: unexpected %s on the engine-worker-queue port", self.instance.instance_id, type(message).__name__)

    def on_cache(self, identity: bytes, message, rest) -> None:
        log.warning("%s: unexpected %s on the cache-queue port", self.instance.instance_id, type(message).__name__)

    def tick(self, now_s: float) -> None:
        pass

    def sockets(self) -> dict:
        """Extra sockets the instance loop should poll: {socket: handler(identity, message, rest)}."""
        return {}

    def step(self) -> None:
        pass

    def close(self) -> None:
        pass


class Frontend(Role):
    """Accepts clients' requests on the engine-worker-queue port and streams their tokens back."""

    def __init__(self, instance: Instance) -> None:
        super().__init__(instance)
        self.clients: dict[str, bytes] = {}  # request id -> the client's zmq identity
        self.num_sent: dict[str, int] = {}  # tokens already streamed

    def on_ewq(self, identity: bytes, message) -> None:
        if isinstance(message, GenerateRequest):
            self.on_generate(identity, message)
        elif isinstance(message, AbortRequest):
            self.on_abort(message.request_id)
        else:
            super().on_ewq(identity, message)

    def on_generate(self, identity: bytes, message: GenerateRequest) -> None:
        if message.request_id in self.clients:
            self._reply(identity, RequestUpdate(message.request_id, [], True, "error",
                                                f"request id {message.request_id!r} is already in use"))
            return
        try:
            params = sampling_from_msg(message.sampling)
            request = self.engine.make_request(message.prompt_token_ids, params, message.request_id)
        except PdlabError as e:
            self._reply(identity, RequestUpdate(message.request_id, [], True, "error", str(e),
                                                len(message.prompt_token_ids)))
            return
        self.clients[request.request_id] = identity
        self.num_sent[request.request_id] = 0
        self.admit(request)

    def admit(self, request: Request) -> None:
        """Queue a validated request (colocated: here; decode: after a remote prefill)."""
        raise NotImplementedError

    def on_abort(self, request_id: str) -> None:
        out = self.engine.abort(request_id)
        if out is not None:
            self.publish(out)

    def publish(self, out: RequestOutput, error: str | None = None) -> None:
        """Stream the tokens the client has not seen yet; on the last update, the text too."""
        identity = self.clients.get(out.request_id)
        if identity is None:
            return
        sent = self.num_sent[out.request_id]
        new = out.token_ids[sent:]
        if not new and not out.finished:
            return
        self.num_sent[out.request_id] = len(out.token_ids)
        self.metrics.on_output(out, len(new))
        logprobs = out.logprobs[sent:] if out.logprobs is not None else None
        self._reply(identity, RequestUpdate(
            out.request_id, new, out.finished, out.finish_reason, error or out.error, len(out.prompt_token_ids),
            out.text if out.finished else None, logprobs,
        ))
        if out.finished:
            del self.clients[out.request_id], self.num_sent[out.request_id]

    def _reply(self, identity: bytes, update: RequestUpdate) -> None:
        self.instance.ewq.send_multipart([identity, encode(update)])


class Mixed(Frontend):
    """Colocated: prefill and decode on this instance."""

    def admit(self, request: Request) -> None:
        self.scheduler.add(request)

    def step(self) -> None:
        for out in self.engine.step():
            self.publish(out)
