"""The API server's side of an instance's engine-worker-queue port, on asyncio.

One zmq DEALER carries every request; one background task (`_route`) reads
what comes back and puts each `RequestUpdate` on its request's queue, so any
number of requests are in flight at once and the instance batches them.
`Pong`s wake every pending `ping`. When the instance process dies, `fail_all`
ends every open request with `EngineUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio

from pdlab.cluster.auth import cluster_token, seal
from pdlab.cluster.messages import (
    AbortRequest,
    GenerateRequest,
    MessageError,
    Ping,
    Pong,
    RequestUpdate,
    SamplingMsg,
    decode,
    encode,
)

log = logging.getLogger("pdlab.api_server")


class EngineUnavailable(Exception):
    """The instance is gone: nothing more will come for any request."""


class RequestStream:
    """The updates of one request, in order. `close()` aborts it if it has not finished."""

    def __init__(self, client: EngineClient, request_id: str, queue: asyncio.Queue) -> None:
        self.client = client
        self.request_id = request_id
        self._queue = queue
        self.finished = False
        self.closed = False

    async def next(self) -> RequestUpdate:
        """The next update; raises `EngineUnavailable` if the instance died first."""
        item = await self._queue.get()
        if isinstance(item, EngineUnavailable):
            self.finished = True  # nothing left to abort
            raise item
        if item.finished:
            self.finished = True
        return item

    def close(self) -> bool:
        """Stop listening; abort the request on the instance (freeing its blocks) if it is still running.
        Returns whether it aborted. Idempotent."""
        if self.closed:
            return False
        self.closed = True
        self.client._streams.pop(self.request_id, None)
        if self.finished:
            return False
        self.client.abort(self.request_id)
        return True


class EngineClient:
    def __init__(self, endpoint: str, token: bytes | None = None) -> None:
        """`token`: the cluster token (default $PDLAB_CLUSTER_TOKEN, see `pdlab.cluster.auth`)."""
        self.endpoint = endpoint
        self.token = token if token is not None else cluster_token()
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)
        self._streams: dict[str, asyncio.Queue] = {}
        self._pong_waiters: list[asyncio.Future] = []
        self._router: asyncio.Task | None = None
        self.unavailable: str | None = None  # why, once the instance is gone

    @property
    def num_open(self) -> int:
        return len(self._streams)

    def start(self) -> None:
        """Start routing replies; call from the event loop that will use this client."""
        self._router = asyncio.create_task(self._route(), name="engine-client-router")

    async def _route(self) -> None:
        while True:
            data = await self._sock.recv()
            try:
                message = decode(data)
            except MessageError as e:
                log.warning("dropped a reply from %s: %s", self.endpoint, e)
                continue
            if isinstance(message, RequestUpdate):
                queue = self._streams.get(message.request_id)
                if queue is not None:  # else: closed already (the client went away)
                    queue.put_nowait(message)
            elif isinstance(message, Pong):
                waiters, self._pong_waiters = self._pong_waiters, []
                for future in waiters:
                    if not future.done():
                        future.set_result(message)

    def open(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingMsg) -> RequestStream:
        """Submit a request; its updates arrive on the returned stream."""
        if self.unavailable:
            raise EngineUnavailable(self.unavailable)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        self._send(GenerateRequest(request_id, list(prompt_token_ids), sampling))
        return RequestStream(self, request_id, queue)

    def abort(self, request_id: str) -> None:
        if not self.unavailable:
            self._send(AbortRequest(request_id))

    async def ping(self, timeout_s: float = 3.0) -> Pong | None:
        """The instance's `Pong`, or None if it does not answer within `timeout_s`."""
        if self.unavailable:
            return None
        future = asyncio.get_running_loop().create_future()
        self._pong_waiters.append(future)
        self._send(Ping())
        try:
            return await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            return None

    def fail_all(self, why: str) -> None:
        """The instance is gone: end every open request (and every later one) with `EngineUnavailable`."""
        self.unavailable = why
        for queue in self._streams.values():
            queue.put_nowait(EngineUnavailable(why))

    def _send(self, message) -> None:
        # A DEALER queues while the peer is (re)connecting, so this does not block; the
        # future only reports errors, which are logged rather than lost.
        future = self._sock.send_multipart(seal(self.token, [encode(message)]))
        future.add_done_callback(_log_send_error)

    async def close(self) -> None:
        if self._router is not None:
            self._router.cancel()
            try:
                await self._router
            except (asyncio.CancelledError, zmq.ZMQError):
                pass
        self._sock.close(linger=0)
        self._ctx.term()


def _log_send_error(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("sending to the instance failed: %s", future.exception())
