"""The prefill role: compute prompts for decode instances and push their KV, layer by layer.

For each `PrefillTask` the request runs here with `max_tokens=1` and the
decode instance's seed, so its first token is the one a colocated run would
sample. As each layer's KV is written during the forward pass it is pushed
into the decode instance's reserved blocks (the transfer overlaps the rest of
the pass). After the last chunk: flush, then `PrefillDone` with the first
token. The blocks stay held until the decode instance's `KVAck` (or a timeout).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import zmq

from pdlab.cluster.frontend import Role
from pdlab.cluster.messages import (
    AbortPrefill, KVAck, KVDescriptor, PrefillDone, PrefillFailed, PrefillTask, encode, sampling_from_msg,
)
from pdlab.errors import PdlabError
from pdlab.policy.scheduler import ScheduledBatch
from pdlab.transfer import make_sender
from pdlab.transfer.base import KVSender, TransferError

log = logging.getLogger("pdlab.instance")


@dataclass
class Target:
    sender: KVSender
    dst_block_ids: list[int]
    ack_deadline_s: float | None = None  # set once PrefillDone is sent
    error: str | None = None


class Prefill(Role):
    def __init__(self, instance) -> None:
        super().__init__(instance)
        self.senders: dict[tuple[str, str], KVSender] = {}
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
            sender = self._sender(task.kv)
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
        self.targets[request.request_id] = Target(sender, list(task.dst_block_ids))
        self.scheduler.add(request)

    def on_abort(self, request_id: str) -> None:
        target = self.targets.get(request_id)
        if target is None:
            return
        target.sender.abort(request_id)
        try:
            target.sender.flush()  # nothing of it is in flight once this returns
        except TransferError as e:  # a failed write is as stopped as a finished one
            log.warning("%s: flushing aborted %s: %s", self.instance.instance_id, request_id, e)
        self.engine.abort(request_id)
        self._release(request_id)
        self._send(target.sender, PrefillFailed(request_id, "aborted by the decode instance"))
        self.metrics.on_transfer_failed("aborted")

    # --- the loop --------------------------------------------------------------------

    def step(self) -> None:
        outputs = self.engine.step(on_kv_written=self._push_layer)
        for out in outputs:
            target = self.targets.get(out.request_id)
            if target is None or not out.finished:
                continue
            if target.error is not None:
                self._fail(out.request_id, target.error)
                continue
            try:
                target.sender.flush()
            except TransferError as e:
                self._fail(out.request_id, str(e))
                continue
            logprobs = out.logprobs[-1] if out.logprobs else None
            self._send(target.sender, PrefillDone(out.request_id, out.token_ids[-1], logprobs, self.instance.instance_id))
            now_s = self.engine.clock()
            target.ack_deadline_s = now_s + self.timeout_s
            self.metrics.on_prefill_done(out, now_s)

    def _push_layer(self, layer: int, batch: ScheduledBatch) -> None:
        bs = self.engine.block_manager.block_size
        for item in batch.items:
            target = self.targets.get(item.request.request_id)
            if target is None or target.error is not None:
                continue
            first, last = item.start // bs, (item.start + item.num_tokens - 1) // bs
            try:
                target.sender.send_layer(item.request.request_id, layer, item.request.block_ids[first: last + 1],
                                         target.dst_block_ids[first: last + 1])
            except TransferError as e:
                target.error = str(e)  # the request fails after this step; no token from partial KV

    def tick(self, now_s: float) -> None:
        for request_id, target in list(self.targets.items()):
            if target.ack_deadline_s is not None and now_s > target.ack_deadline_s:
                log.warning("%s: no KVAck for %s within %.1f s; freeing its blocks",
                            self.instance.instance_id, request_id, self.timeout_s)
                self._release(request_id)

    def close(self) -> None:
        for sender in self.senders.values():
            sender.close()
            sender.socket.close(linger=0)

    # --- helpers ---------------------------------------------------------------------

    def _sender(self, kv: KVDescriptor) -> KVSender:
        key = (kv.instance_id, kv.cache_endpoint)
        if key not in self.senders:
            sock = self.instance.zmq.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            try:
                sock.connect(kv.cache_endpoint)
                self.senders[key] = make_sender(kv.protocol, self.engine.kv_cache, kv, sock)
            except (TransferError, ValueError, zmq.ZMQError) as e:
                sock.close(linger=0)
                raise TransferError(f"cannot send KV to {kv.instance_id} at {kv.cache_endpoint!r}: {e}") from None
        return self.senders[key]

    def _fail(self, request_id: str, error: str) -> None:
        self.metrics.on_transfer_failed("prefill_failed")
        target = self.targets.get(request_id)
        self.engine.abort(request_id)
        self._release(request_id)
        if target is not None:
            self._send(target.sender, PrefillFailed(request_id, error))

    def _release(self, request_id: str) -> None:
        self.targets.pop(request_id, None)
        self.scheduler.release(request_id)

    def _send(self, sender: KVSender, message) -> None:
        sender.socket.send(encode(message))

    def _send_failed(self, kv: KVDescriptor, request_id: str, error: str) -> None:
        sock = self.instance.zmq.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        try:
            sock.connect(kv.cache_endpoint)
            sock.send(encode(PrefillFailed(request_id, error)), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.warning("%s: cannot tell %s that %s failed (%s): %s", self.instance.instance_id, kv.cache_endpoint,
                        request_id, e, error)
        finally:
            sock.close()
