"""The prefill role: compute prompts for decode instances and push their KV, layer by layer.

For each `PrefillTask` the request runs here with `max_tokens=1` and the
decode instance's seed, so its first token is the one a colocated run would
sample. As each layer's KV is written during the forward pass it is pushed
into the decode instance's reserved blocks (the transfer overlaps the rest of
the pass). After the last chunk: flush, then `PrefillDone` with the first
token. The blocks stay held until the decode instance's `KVAck` (or a timeout).

A decode instance that dies or is cut off must not stop this one: sends never
block (queues are unbounded), zmq heartbeats find a silent peer within
`--transfer-timeout-s`, and once the connection to a decode instance drops
every request for it is dropped here and its blocks freed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from pdlab.cluster.auth import SealedSocket, seal
from pdlab.cluster.roles import Role
from pdlab.cluster.messages import (
    AbortPrefill, KVAck, KVDescriptor, PrefillDone, PrefillFailed, PrefillTask, encode, sampling_from_msg,
)
from pdlab.engine.kv_io import Push
from pdlab.errors import PdlabError
from pdlab.policy.scheduler import ScheduledBatch
from pdlab.transfer.base import TransferError

log = logging.getLogger("pdlab.instance")

HEARTBEAT_IVL_MS = 1000  # zmq heartbeats to each decode instance; silence past --transfer-timeout-s drops it


@dataclass
class Destination:
    """A decode instance this one sends KV to."""

    sender: int  # its sender in the runner's KVTransfers (one on every tensor-parallel rank)
    socket: SealedSocket  # to its cache endpoint: PrefillDone, PrefillFailed (and, over tcp, the KV)
    monitor: zmq.Socket  # disconnect events of `socket`


@dataclass
class Target:
    destination: tuple[str, str]  # the decode instance's (instance id, cache endpoint)
    dst_block_ids: list[int]
    ack_deadline_s: float | None = None  # set once PrefillDone is sent
    num_frames: int = 0  # KV layer frames pushed (one per layer per chunk), reported in PrefillDone


class Prefill(Role):
    def __init__(self, instance) -> None:
        super().__init__(instance)
        self.transfers = self.engine.runner.transfers
        self.destinations: dict[tuple[str, str], Destination] = {}
        self.targets: dict[str, Target] = {}
        self.timeout_s = instance.args.transfer_timeout_s

    # --- messages ------------------------------------------------------------------

    def on_ewq(self, identity: bytes, message) -> None:
        if isinstance(message, PrefillTask):
            self.on_task(message)
        elif isinstance(message, KVAck):
            self._release(message.request_id)
        elif isinstance(message, AbortPrefill):
            self.on_abort(message.request_id)
        else:
            super().on_ewq(identity, message)

    def on_task(self, task: PrefillTask) -> None:
        try:
            destination = self._destination(task.kv)
            # One token past the ones it has: the first a decode instance has not seen.
            params = sampling_from_msg(task.sampling, max_tokens=len(task.output_token_ids) + 1)
            request = self.engine.make_request(task.prompt_token_ids, params, task.request_id, seed=task.seed,
                                               output_token_ids=task.output_token_ids)
            bs = self.engine.block_manager.block_size
            if len(task.dst_block_ids) < -(-request.num_tokens // bs):
                raise TransferError(f"{len(task.dst_block_ids)} destination blocks cannot hold {request.num_tokens} tokens")
        except (PdlabError, TransferError) as e:
            self._send_failed(task.kv, task.request_id, str(e))
            self.metrics.on_transfer_failed("prefill_failed")
            return
        request.keep_blocks_after_finish = True
        self.targets[request.request_id] = Target(destination, list(task.dst_block_ids))
        self.scheduler.add(request)

    def on_abort(self, request_id: str) -> None:
        target = self.targets.get(request_id)
        if target is None:
            return
        try:  # nothing of it is in flight once this returns
            self.transfers.flush(self.destinations[target.destination].sender, request_id)
        except TransferError as e:  # a failed write is as stopped as a finished one
            log.warning("%s: flushing aborted %s: %s", self.instance.instance_id, request_id, e)
        self.engine.abort(request_id)
        self._release(request_id)
        self._send(target, PrefillFailed(request_id, "aborted by the decode instance"))
        self.metrics.on_transfer_failed("aborted")

    # --- the loop --------------------------------------------------------------------

    def step(self) -> None:
        outputs = self.engine.step(push_plan=self._plan)
        for out in outputs:
            target = self.targets.get(out.request_id)
            if target is None or not out.finished:
                continue
            try:  # every rank's writes have landed, and none of the request's failed
                self.transfers.flush(self.destinations[target.destination].sender, out.request_id)
            except TransferError as e:
                self._fail(out.request_id, str(e))
                continue
            logprobs = out.logprobs[-1] if out.logprobs else None
            self._send(target, PrefillDone(out.request_id, out.token_ids[-1], logprobs,
                                           self.instance.instance_id, target.num_frames))
            now_s = self.engine.clock()
            target.ack_deadline_s = now_s + self.timeout_s
            self.metrics.on_prefill_done(out, now_s)

    def _plan(self, batch: ScheduledBatch) -> list[Push]:
        """The step's KV copies: each chunk's blocks to the same positions' blocks on the decode side.
        The runner makes them layer by layer inside the forward pass; a failed one fails the request
        after the step (no token from partial KV)."""
        bs = self.engine.block_manager.block_size
        pushes = []
        for item in batch.items:
            target = self.targets.get(item.request.request_id)
            if target is None:
                continue
            target.num_frames += self.engine.model_config.num_layers
            first, last = item.start // bs, (item.start + item.num_tokens - 1) // bs
            pushes.append(Push(item.request.request_id, self.destinations[target.destination].sender,
                               item.request.block_ids[first: last + 1], target.dst_block_ids[first: last + 1]))
        return pushes

    def tick(self, now_s: float) -> None:
        for key, destination in list(self.destinations.items()):
            if _disconnected(destination.monitor):
                self._lose_destination(key)
        for request_id, target in list(self.targets.items()):
            if target.ack_deadline_s is not None and now_s > target.ack_deadline_s:
                log.warning("%s: no KVAck for %s within %.1f s; freeing its blocks",
                            self.instance.instance_id, request_id, self.timeout_s)
                self._release(request_id)

    def close(self) -> None:
        for key in list(self.destinations):
            self._close_destination(key)

    # --- helpers ---------------------------------------------------------------------

    def _destination(self, kv: KVDescriptor) -> tuple[str, str]:
        """The decode instance `kv` describes, connected (a sender on every rank) on first use."""
        key = (kv.instance_id, kv.cache_endpoint)
        if key not in self.destinations:
            sock = self.instance.zmq.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # With the default high-water mark a send blocks once 1,000 frames wait for a decode instance
            # that died or is cut off, and this whole instance with it. Unbounded instead; a peer that
            # stops answering zmq's heartbeats counts as disconnected, and its queue is dropped.
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(HEARTBEAT_IVL_MS, int(self.timeout_s * 1000)))
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            try:
                sock.connect(kv.cache_endpoint)
                sealed = SealedSocket(sock, self.instance.token)
                self.destinations[key] = Destination(self.transfers.open_sender(kv, sealed), sealed, monitor)
            except (TransferError, ValueError, zmq.ZMQError) as e:
                sock.disable_monitor()
                monitor.close(linger=0)
                sock.close(linger=0)
                raise TransferError(f"cannot send KV to {kv.instance_id} at {kv.cache_endpoint!r}: {e}") from None
        return key

    def _lose_destination(self, key: tuple[str, str]) -> None:
        """The connection to a decode instance dropped: nothing sent to it since is known to arrive, and
        no KVAck will come. Drop its requests, free their blocks, and forget what is queued for it."""
        lost = [request_id for request_id, target in self.targets.items() if target.destination == key]
        if lost:
            log.warning("%s: lost the connection to %s (%s); dropping its %d request(s) and freeing their blocks",
                        self.instance.instance_id, key[0], key[1], len(lost))
        for request_id in lost:
            self.engine.abort(request_id)
            self._release(request_id)
            self.metrics.on_transfer_failed("decode_lost")
        self._close_destination(key)

    def _close_destination(self, key: tuple[str, str]) -> None:
        destination = self.destinations.pop(key)
        self.transfers.close_sender(destination.sender)
        destination.socket.disable_monitor()
        destination.monitor.close(linger=0)
        destination.socket.close(linger=0)

    def _fail(self, request_id: str, error: str) -> None:
        self.metrics.on_transfer_failed("prefill_failed")
        target = self.targets.get(request_id)
        self.engine.abort(request_id)
        self._release(request_id)
        if target is not None:
            self._send(target, PrefillFailed(request_id, error))

    def _release(self, request_id: str) -> None:
        self.targets.pop(request_id, None)
        self.scheduler.release(request_id)

    def _send(self, target: Target, message) -> None:
        destination = self.destinations.get(target.destination)
        if destination is not None:
            destination.socket.send(encode(message))

    def _send_failed(self, kv: KVDescriptor, request_id: str, error: str) -> None:
        """Tell a decode instance that its task cannot be served (on a socket of its own: there may be no sender)."""
        sock = self.instance.zmq.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        try:
            sock.connect(kv.cache_endpoint)
            sock.send_multipart(seal(self.instance.token, [encode(PrefillFailed(request_id, error))]), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.warning("%s: cannot tell %s that %s failed (%s): %s", self.instance.instance_id, kv.cache_endpoint,
                        request_id, e, error)
        finally:
            sock.close()


def _disconnected(monitor: zmq.Socket) -> bool:
    """Whether the monitored socket's connection dropped since the last look."""
    dropped = False
    while True:
        try:
            event = recv_monitor_message(monitor, zmq.NOBLOCK)
        except zmq.Again:
            return dropped
        dropped |= event["event"] == zmq.EVENT_DISCONNECTED
