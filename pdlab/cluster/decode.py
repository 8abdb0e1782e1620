"""The decode role: the entry point of a disaggregated pair (FastDeploy's single-machine mode).

A client's request waits here until its prompt's KV blocks can be reserved
(admission control: in order, never dropped); then a prefill instance, picked
by the dispatch policy among `--innode-prefill-ports`, gets a `PrefillTask`
naming those blocks. The prefill pushes the KV into them and reports the first
token (`PrefillDone`); the request joins the running batch with nothing
recomputed, and the prefill is told to free its copy (`KVAck`).

Failures: a prefill that does not deliver within `--transfer-timeout-s` (or
reports `PrefillFailed`) ends the request with an error and frees its
reservation. With `ipc`, where the prefill writes straight into this cache,
the blocks of a request aborted mid-transfer are held until the prefill
confirms it stopped (or a second timeout passes), so a late write never lands
in a reused block. Over `tcp` late frames are simply dropped.

Each dispatch is a transfer with an id of its own (`{request id}/{n}`), which
the prefill's task, frames, `PrefillDone` and `PrefillFailed` carry: a late
message of an aborted transfer is never taken for the transfer of a request
that reuses the id. Over `tcp` a transfer counts as complete only if every
layer of every block of the prompt arrived, in as many frames as the prefill
sent (`PrefillDone.num_kv_frames`): frames lost on the way (a connection that
dropped and came back) end the request with an error, never with tokens
computed from partial KV.

With the splitwise scheduler (`--scheduler-name splitwise`), tasks come from
this instance's Redis inbox instead, each naming its prefill instance and the
pair's protocol; prefill peers are connected as tasks name them, and a request
whose prefill is lost ends with `retry` set, so that its router sends it
elsewhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from pdlab.cluster.args import parse_ports
from pdlab.cluster.auth import seal
from pdlab.cluster.frontend import Frontend
from pdlab.cluster.splitwise.wire import Task
from pdlab.cluster.messages import (
    AbortPrefill, KVAck, KVDescriptor, KVLayer, Ping, Pong, PrefillDone, PrefillFailed, PrefillTask, encode,
    sampling_to_msg,
)
from pdlab.errors import ConfigError
from pdlab.policy.dispatch import LeastLoaded
from pdlab.policy.request import Request, RequestStatus
from pdlab.transfer.base import TransferError

log = logging.getLogger("pdlab.instance")


@dataclass
class Transfer:
    peer: PrefillPeer
    deadline_s: float
    dispatched_s: float = 0.0
    protocol: str = "tcp"
    transfer_id: str = ""  # what the prefill's messages about it carry
    num_frames: int = 0  # tcp: KV layer frames written
    covered: dict[int, set[int]] = field(default_factory=dict)  # tcp: layer -> blocks written


@dataclass
class PrefillPeer:
    """A prefill instance as this decode instance sees it."""

    name: str
    sock: zmq.Socket  # DEALER to its engine-worker-queue port
    outstanding: int = 0
    last_seen_s: float | None = None  # its last Pong
    busy_since_s: float | None = None  # when `outstanding` last rose from 0
    incarnation: str = ""
    last_ping_s: float = float("-inf")
    monitor: zmq.Socket | None = None  # connect/disconnect events of `sock`


@dataclass(frozen=True)
class Assignment:
    """The prefill instance and protocol a splitwise router chose for one request."""

    prefill_id: str
    endpoint: str
    protocol: str


class Decode(Frontend):
    def __init__(self, instance) -> None:
        super().__init__(instance)
        ports = parse_ports(instance.args.innode_prefill_ports)
        if not ports and instance.agent is None:
            raise ConfigError("a decode instance needs --innode-prefill-ports (the prefill instances' "
                              "engine-worker-queue ports), or --scheduler-name splitwise")
        self.peers: dict[str, PrefillPeer] = {}  # by endpoint
        self.innode = [self._peer(instance.endpoint(port), f"prefill:{port}") for port in ports]
        self.dispatch = LeastLoaded()
        self.timeout_s = instance.args.transfer_timeout_s
        self.heartbeat_s = min(1.0, self.timeout_s / 4)
        # A receiver per protocol on every tensor-parallel rank; prefill rank r writes into rank r.
        self.kv_io = self.engine.runner.transfers
        self.descriptors = {p: self._descriptor(p) for p in instance.protocols}
        self.assigned: dict[str, Assignment] = {}  # splitwise requests: their prefill and protocol
        self.transfers: dict[str, Transfer] = {}  # requests whose KV is on its way
        self.quarantine: dict[str, Transfer] = {}  # aborted mid-transfer, blocks held until the prefill confirms
        self.undispatched: dict[str, float] = {}  # reserved, but no prefill took the task yet: request id -> give-up time
        self.by_transfer: dict[str, str] = {}  # transfer id -> request id, while the prefill may still send about it
        self._num_dispatched = 0

    def _descriptor(self, protocol: str) -> KVDescriptor:
        """Open `protocol`'s receivers (rdma: one --rdma-comm-ports port per GPU, NICs from
        $KVCACHE_RDMA_NICS) and describe where prefill instances write."""
        instance, kv = self.instance, self.engine.kv_cache.kv
        ranks = self.kv_io.open_receiver(protocol, parse_ports(instance.args.rdma_comm_ports), instance.host,
                                         instance.advertise_host)
        return KVDescriptor(
            instance_id=instance.instance_id, protocol=protocol, cache_endpoint=instance.peer_cache_endpoint,
            num_layers=kv.shape[0], num_blocks=kv.shape[2], block_size=kv.shape[3], num_kv_heads=kv.shape[4],
            head_dim=kv.shape[5], dtype=str(kv.dtype).removeprefix("torch."), host=instance.host,
            **msgspec.structs.asdict(ranks[0]), tensor_parallel_size=len(ranks),
            ranks=ranks if len(ranks) > 1 else [])

    def _peer(self, endpoint: str, name: str) -> PrefillPeer:
        """The connection to the prefill instance at `endpoint`, made on first use and polled by the loop."""
        peer = self.peers.get(endpoint)
        if peer is None:
            sock = self.instance.zmq.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # Queue nothing for a prefill that is not connected: a restarted one must
            # never receive tasks its predecessor was given.
            sock.setsockopt(zmq.IMMEDIATE, 1)
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            sock.connect(endpoint)
            peer = self.peers[endpoint] = PrefillPeer(name, sock, monitor=monitor)
            self.instance.watch(sock, lambda identity, message, rest, peer=peer: self.on_peer(peer, message))
        return peer

    def protocol_of(self, request_id: str) -> str:
        assigned = self.assigned.get(request_id)
        return assigned.protocol if assigned is not None else self.instance.protocol

    def admit(self, request: Request, task: Task | None) -> None:
        if task is not None:
            if task.protocol not in self.descriptors or not task.prefill_endpoint:
                self.fail(request.request_id, f"the router asked for KV over {task.protocol!r} from "
                                              f"{task.prefill_id!r}; this instance receives over "
                                              f"{', '.join(self.descriptors)}", retry=True)
                return
            self.assigned[request.request_id] = Assignment(task.prefill_id, task.prefill_endpoint, task.protocol)
        self.scheduler.add_remote(request)

    # --- messages ---------------------------------------------------------------------

    def on_cache(self, identity: bytes, message, rest) -> None:
        if isinstance(message, KVLayer):
            self.on_kv_layer(message, rest)
        elif isinstance(message, PrefillDone):
            self.on_prefill_done(message)
        elif isinstance(message, PrefillFailed):
            self.on_prefill_failed(message)
        else:
            super().on_cache(identity, message, rest)

    def _transfer_of(self, transfer_id: str) -> tuple[str, Transfer | None]:
        """The request id and the live (or quarantined) transfer a prefill's message is about."""
        request_id = self.by_transfer.get(transfer_id, "")
        transfer = self.transfers.get(request_id) or self.quarantine.get(request_id)
        return request_id, transfer if transfer is not None and transfer.transfer_id == transfer_id else None

    def on_kv_layer(self, header: KVLayer, rest) -> None:
        request_id, transfer = self._transfer_of(header.request_id)
        request = self.scheduler.transferring.get(request_id)
        # A late frame of an aborted or timed-out transfer must not touch blocks that may be reused.
        if (transfer is None or request is None or request_id in self.quarantine
                or not set(header.dst_block_ids) <= set(request.block_ids) or len(rest) != 1):
            return
        try:
            receiver = self.kv_io.receiver(transfer.protocol)
            if receiver is None:
                raise TransferError("no receiver for its protocol")
            receiver.write_layer(msgspec.structs.replace(header, request_id=request_id), rest[0].buffer)
        except TransferError as e:
            self.fail(request_id, f"KV transfer failed: {e}")
            return
        transfer.num_frames += 1
        transfer.covered.setdefault(header.layer, set()).update(header.dst_block_ids)

    def on_peer(self, peer: PrefillPeer, message) -> None:
        if not isinstance(message, Pong):
            return
        if peer.incarnation and message.incarnation != peer.incarnation and peer.last_seen_s is not None:
            # Tasks sent before the old process last answered went to it and are lost. (A lost
            # connection has normally failed them already; later ones went to the new process.)
            self._lose_peer(peer, f"{peer.name} restarted", sent_before_s=peer.last_seen_s)
        peer.incarnation = message.incarnation
        peer.last_seen_s = self.engine.clock()

    def on_prefill_done(self, message: PrefillDone) -> None:
        request_id, transfer = self._transfer_of(message.request_id)
        if transfer is None:
            return
        self.transfers.pop(request_id, None) or self.quarantine.pop(request_id, None)
        self._settle(transfer)
        self._send(transfer.peer, KVAck(transfer.transfer_id))
        request = self.scheduler.transferring.get(request_id)
        if request is None:  # aborted while the KV was on its way: nothing writes its blocks any more
            self.scheduler.release(request_id)
            return
        request.keep_blocks_after_finish = False
        missing = self._missing_kv(transfer, request, message)
        if missing:
            self.metrics.on_transfer_failed("prefill_failed")
            self._end(request_id, f"KV transfer incomplete: {missing}", retry=True)
            return
        try:
            self.kv_io.commit(transfer.protocol, request.block_ids)
        except TransferError as e:
            self._end(request_id, f"KV transfer failed: {e}", retry=True)
            return
        self.metrics.on_kv_received(request.num_prompt_tokens, self.engine.clock() - transfer.dispatched_s)
        if message.logprobs is not None:
            self.engine.record_logprobs(request_id, message.logprobs)
        self.scheduler.complete_transfer(request_id, message.first_token_id, self.engine.clock())
        self.engine.apply_stop_strings([request])
        self.publish(self.engine.output(request))

    def _missing_kv(self, transfer: Transfer, request: Request, done: PrefillDone) -> str:
        """What a tcp transfer lacks ("": nothing): a layer of a block of the known tokens, or frames."""
        if transfer.protocol != "tcp":
            return ""  # the prefill wrote the cache itself; it reports only once every write is done
        bs = self.engine.block_manager.block_size
        blocks = set(request.block_ids[: -(-request.num_tokens // bs)])
        num_layers = self.engine.kv_cache.kv.shape[0]
        short = [layer for layer in range(num_layers) if not blocks <= transfer.covered.get(layer, set())]
        if short:
            return f"layers {short} of the prompt's blocks never arrived"
        if done.num_kv_frames >= 0 and transfer.num_frames != done.num_kv_frames:
            return f"{transfer.num_frames} of the {done.num_kv_frames} KV frames the prefill sent arrived"
        return ""

    def on_prefill_failed(self, message: PrefillFailed) -> None:
        request_id, transfer = self._transfer_of(message.request_id)
        if transfer is None:
            return
        self.transfers.pop(request_id, None) or self.quarantine.pop(request_id, None)
        self._settle(transfer)
        request = self.scheduler.transferring.get(request_id)
        if request is not None:
            # The prefill stopped writing before it said so: the blocks can go back at once.
            request.keep_blocks_after_finish = False
            self.metrics.on_transfer_failed("prefill_failed")
            self._end(request_id, f"prefill failed: {message.error}")
        self.scheduler.release(request_id)

    def on_abort(self, request_id: str) -> None:
        if request_id in self.quarantine:  # already aborted; its blocks wait for the prefill
            return
        request = self.scheduler.requests.get(request_id)
        if request is not None and request.status is RequestStatus.TRANSFERRING:
            self.metrics.on_transfer_failed("aborted")
            self._cancel_transfer(request_id)
        super().on_abort(request_id)

    # --- the loop ----------------------------------------------------------------------

    def tick(self, now_s: float) -> None:
        super().tick(now_s)
        for request in self.scheduler.reserve():
            # Remote writes into our blocks can outlive an abort only with ipc and rdma.
            request.keep_blocks_after_finish = self.protocol_of(request.request_id) != "tcp"
            self.undispatched[request.request_id] = now_s + self.timeout_s
        for request_id, give_up_s in list(self.undispatched.items()):
            if not self._dispatch(request_id, now_s) and now_s > give_up_s:
                del self.undispatched[request_id]
                request = self.scheduler.transferring.get(request_id)
                if request is not None:
                    request.keep_blocks_after_finish = False  # nothing was sent: nobody writes its blocks
                self.metrics.on_transfer_failed("timeout")
                self._end(request_id, f"no prefill instance accepted the task within {self.timeout_s:.1f} s",
                          retry=True)
        for peer in self.peers.values():
            if self._disconnected(peer):
                self._lose_peer(peer, f"{peer.name} closed its connection")
            if now_s - peer.last_ping_s >= self.heartbeat_s:
                peer.last_ping_s = now_s
                self._send(peer, Ping())
            seen = max(peer.last_seen_s or float("-inf"), peer.busy_since_s or float("-inf"))
            if peer.outstanding and now_s - seen > self.timeout_s:
                self._lose_peer(peer, f"{peer.name} stopped answering for {self.timeout_s:.1f} s")
        for request_id, transfer in list(self.quarantine.items()):
            if now_s > transfer.deadline_s:  # the prefill never confirmed: it is gone, and so are its writes
                del self.quarantine[request_id]
                self._settle(transfer)
                self.scheduler.release(request_id)

    def _dispatch(self, request_id: str, now_s: float) -> bool:
        """Send the prefill task to its assigned prefill, or to the least loaded of --innode-prefill-ports
        that takes it; False if none does."""
        request = self.scheduler.transferring.get(request_id)
        if request is None:
            self.undispatched.pop(request_id, None)
            return True
        assigned = self.assigned.get(request_id)
        candidates = [self._peer(assigned.endpoint, assigned.prefill_id)] if assigned else self.innode
        protocol = self.protocol_of(request_id)
        self._num_dispatched += 1
        transfer_id = f"{request_id}/{self._num_dispatched}"
        task = PrefillTask(transfer_id, request.prompt_token_ids, sampling_to_msg(request.params),
                           request.seed, list(request.block_ids), self.descriptors[protocol],
                           list(request.output_token_ids))
        loads = [peer.outstanding for peer in candidates]
        for _ in candidates:
            index = self.dispatch.pick(loads)
            peer = candidates[index]
            if self._send(peer, task):
                del self.undispatched[request_id]
                if peer.outstanding == 0:
                    peer.busy_since_s = now_s
                peer.outstanding += 1
                self.transfers[request_id] = Transfer(peer, now_s + self.timeout_s, now_s, protocol, transfer_id)
                self.by_transfer[transfer_id] = request_id
                return True
            loads[index] = float("inf")
        return False

    def _send(self, peer: PrefillPeer, message) -> bool:
        try:
            peer.sock.send_multipart(seal(self.instance.token, [encode(message)]), zmq.NOBLOCK)
            return True
        except zmq.Again:  # not connected (not up yet, or gone)
            return False

    def _settle(self, transfer: Transfer) -> None:
        """The transfer is over (or given up on): nothing the prefill sends about it counts any more."""
        transfer.peer.outstanding -= 1
        self.by_transfer.pop(transfer.transfer_id, None)

    def _disconnected(self, peer: PrefillPeer) -> bool:
        """Whether the connection to `peer` dropped since the last look (the process died or restarted)."""
        dropped = False
        while True:
            try:
                event = recv_monitor_message(peer.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return dropped
            dropped |= event["event"] == zmq.EVENT_DISCONNECTED

    def _lose_peer(self, peer: PrefillPeer, why: str, sent_before_s: float = float("inf")) -> None:
        """Tasks sent to `peer` (before `sent_before_s`) are lost: end those requests; its writes stopped with it."""
        for request_id, transfer in list(self.transfers.items()):
            if transfer.peer is peer and transfer.dispatched_s < sent_before_s:
                del self.transfers[request_id]
                self._settle(transfer)
                request = self.scheduler.transferring.get(request_id)
                if request is not None:
                    request.keep_blocks_after_finish = False
                self.metrics.on_transfer_failed("prefill_lost")
                self._end(request_id, f"{why}; the request's KV never arrived", retry=True)
        for request_id, transfer in list(self.quarantine.items()):
            if transfer.peer is peer and transfer.dispatched_s < sent_before_s:
                del self.quarantine[request_id]
                self._settle(transfer)
                self.scheduler.release(request_id)
        peer.busy_since_s = None if peer.outstanding == 0 else self.engine.clock()

    def step(self) -> None:
        for out in self.engine.step():
            self.publish(out)

    def publish(self, out, error: str | None = None, retry: bool = False) -> None:
        super().publish(out, error, retry)
        if out.finished:
            self.assigned.pop(out.request_id, None)

    def close(self) -> None:
        self.kv_io.close()
        for peer in self.peers.values():
            peer.sock.disable_monitor()
            peer.monitor.close(linger=0)
            peer.sock.close(linger=0)

    # --- failure paths -------------------------------------------------------------------

    def fail(self, request_id: str, error: str, retry: bool = False) -> None:
        request = self.scheduler.requests.get(request_id)
        if request is not None and request.status is RequestStatus.TRANSFERRING:
            self.metrics.on_transfer_failed("prefill_failed")
            self._cancel_transfer(request_id)
        self._end(request_id, error, retry)

    def _cancel_transfer(self, request_id: str) -> None:
        if self.undispatched.pop(request_id, None) is not None:
            request = self.scheduler.transferring.get(request_id)
            if request is not None:
                request.keep_blocks_after_finish = False
            return
        transfer = self.transfers.pop(request_id, None)
        if transfer is None:
            return
        self._send(transfer.peer, AbortPrefill(transfer.transfer_id))
        if transfer.protocol != "tcp":
            transfer.deadline_s = self.engine.clock() + self.timeout_s
            self.quarantine[request_id] = transfer
        else:
            self._settle(transfer)

    def _end(self, request_id: str, error: str, retry: bool = False) -> None:
        super().fail(request_id, error, retry)
