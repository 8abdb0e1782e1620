"""The decode role: the entry point of a disaggregated pair (FastDeploy's single-machine mode).

A client's request waits here until its prompt's KV blocks can be reserved
(admission control: in order, never dropped); then a prefill instance, picked
by the dispatch policy among `--innode-prefill-ports`, gets a `PrefillTask`
naming those blocks. The prefill pushes the KV into them and reports the first
token (`PrefillDone`); the request joins the running batch with nothing
recomputed, and the prefill is told to free its copy (`KVAck`).

What happens to each transfer is decided by `pdlab.policy.transfers` (its
docstring draws the states); this module does the sends and the engine calls.
Failures: a request ends with an error and its reservation is freed when no
prefill takes its task within `--transfer-timeout-s`, the prefill reports
`PrefillFailed`, its connection drops, or it answers no heartbeat for
`--transfer-timeout-s` while it owes KV. A prefill slower than that which
answers heartbeats is waited for. With `ipc`, where the prefill writes
straight into this cache, the blocks of a request aborted mid-transfer are
held until the prefill confirms it stopped (or a second timeout passes), so a
late write never lands in a reused block. Over `tcp` late frames are simply
dropped.

Each reservation is a transfer with an id of its own (`{request id}/{n}`), which
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
from dataclasses import dataclass

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
from pdlab.policy.request import Request
from pdlab.policy.transfers import Transfer, Transfers
from pdlab.transfer.base import TransferError

log = logging.getLogger("pdlab.instance")


@dataclass
class PrefillPeer:
    """The connection to a prefill instance (what it owes: `Transfers.peers[endpoint]`)."""

    endpoint: str
    name: str
    sock: zmq.Socket  # DEALER to its engine-worker-queue port
    monitor: zmq.Socket  # connect/disconnect events of `sock`
    last_ping_s: float = float("-inf")


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
        self.transfers = Transfers(self.timeout_s)  # each reserved request's KV on its way, and the peers'

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
            peer = self.peers[endpoint] = PrefillPeer(endpoint, name, sock, monitor)
            self.instance.watch(sock, lambda identity, message, rest, peer=peer: self.on_peer(peer, message))
        return peer

    def protocol_of(self, request_id: str) -> str:
        assigned = self.assigned.get(request_id)
        return assigned.protocol if assigned is not None else self.instance.protocol

    def admit(self, request: Request, task: Task | None) -> None:
        self.scheduler.add_remote(request)  # first: a request refused below is then ended like any other
        if task is not None:
            if task.protocol not in self.descriptors or not task.prefill_endpoint:
                self.fail(request.request_id, f"the router asked for KV over {task.protocol!r} from "
                                              f"{task.prefill_id!r}; this instance receives over "
                                              f"{', '.join(self.descriptors)}", retry=True)
                return
            self.assigned[request.request_id] = Assignment(task.prefill_id, task.prefill_endpoint, task.protocol)

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

    def on_kv_layer(self, header: KVLayer, rest) -> None:
        transfer = self.transfers.receiving(header.request_id)
        request = self.scheduler.transferring.get(transfer.request_id) if transfer is not None else None
        # A late frame of an aborted or timed-out transfer must not touch blocks that may be reused.
        if request is None or not set(header.dst_block_ids) <= set(request.block_ids) or len(rest) != 1:
            return
        try:
            receiver = self.kv_io.receiver(transfer.protocol)
            if receiver is None:
                raise TransferError("no receiver for its protocol")
            receiver.write_layer(msgspec.structs.replace(header, request_id=request.request_id), rest[0].buffer)
        except TransferError as e:
            self.fail(request.request_id, f"KV transfer failed: {e}")
            return
        transfer.record_frame(header.layer, header.dst_block_ids)

    def on_peer(self, peer: PrefillPeer, message) -> None:
        if isinstance(message, Pong):
            # From a new process: the tasks sent before the old one last answered went to it and are lost. (A lost
            # connection has normally failed them already; later ones went to the new process.)
            lost = self.transfers.heard_from(peer.endpoint, message.incarnation, self.engine.clock())
            self._settled(lost, f"{peer.name} restarted; the request's KV never arrived", "prefill_lost", retry=True)

    def on_prefill_done(self, message: PrefillDone) -> None:
        transfer = self.transfers.done(message.request_id)
        if transfer is None:
            return
        self._send(self.peers[transfer.peer], KVAck(transfer.transfer_id))
        request_id = transfer.request_id
        request = self.scheduler.transferring.get(request_id)
        if request is None:  # released: aborted while the KV was on its way, and nothing writes its blocks any more
            self._release(request_id)
            return
        request.keep_blocks_after_finish = False  # its KV landed: its blocks go back when it finishes
        bs = self.engine.block_manager.block_size
        missing = transfer.missing_kv(set(request.block_ids[: -(-request.num_tokens // bs)]),
                                      self.engine.kv_cache.kv.shape[0], message.num_kv_frames)
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

    def on_prefill_failed(self, message: PrefillFailed) -> None:
        transfer = self.transfers.failed(message.request_id)
        if transfer is not None:  # the prefill stopped writing before it said so: the blocks can go back at once
            self._settled([transfer], f"prefill failed: {message.error}", "prefill_failed")

    def on_abort(self, request_id: str) -> None:
        if self._cancel(request_id) is not None:
            self.metrics.on_transfer_failed("aborted")
        super().on_abort(request_id)
        self._release(request_id)

    # --- the loop ----------------------------------------------------------------------

    def tick(self, now_s: float) -> None:
        super().tick(now_s)
        for request in self.scheduler.reserve():
            # Held when the request ends until `self.transfers` says no late write can land in them (`_release`).
            request.keep_blocks_after_finish = True
            self.transfers.reserve(request.request_id, self.protocol_of(request.request_id), now_s)
        for transfer in self.transfers.undispatched():
            self._dispatch(transfer, now_s)
        self._settled(self.transfers.expire(now_s), f"no prefill instance accepted the task within "
                                                    f"{self.timeout_s:.1f} s", "timeout", retry=True)
        for peer in self.peers.values():
            if self._disconnected(peer):
                self._lose_peer(peer, f"{peer.name} closed its connection")
            if now_s - peer.last_ping_s >= self.heartbeat_s:
                peer.last_ping_s = now_s
                self._send(peer, Ping())
        for endpoint in self.transfers.silent_peers(now_s):
            peer = self.peers[endpoint]
            self._lose_peer(peer, f"{peer.name} stopped answering for {self.timeout_s:.1f} s")

    def _dispatch(self, transfer: Transfer, now_s: float) -> None:
        """Send the prefill task to its assigned prefill, or to the least loaded of --innode-prefill-ports
        that takes it; if none does, it stays undispatched."""
        request = self.scheduler.transferring.get(transfer.request_id)
        if request is None:  # ended without its transfer cancelled: never sent, and given up on at its deadline
            return
        assigned = self.assigned.get(transfer.request_id)
        candidates = [self._peer(assigned.endpoint, assigned.prefill_id)] if assigned else self.innode
        task = PrefillTask(transfer.transfer_id, request.prompt_token_ids, sampling_to_msg(request.params),
                           request.seed, list(request.block_ids), self.descriptors[transfer.protocol],
                           list(request.output_token_ids))
        loads = [self.transfers.peer(peer.endpoint).num_outstanding for peer in candidates]
        for _ in candidates:
            index = self.dispatch.pick(loads)
            if self._send(candidates[index], task):
                self.transfers.dispatched(transfer.request_id, candidates[index].endpoint, now_s)
                return
            loads[index] = float("inf")

    def _send(self, peer: PrefillPeer, message) -> bool:
        try:
            peer.sock.send_multipart(seal(self.instance.token, [encode(message)]), zmq.NOBLOCK)
            return True
        except zmq.Again:  # not connected (not up yet, or gone)
            return False

    def _disconnected(self, peer: PrefillPeer) -> bool:
        """Whether the connection to `peer` dropped since the last look (the process died or restarted)."""
        dropped = False
        while True:
            try:
                event = recv_monitor_message(peer.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return dropped
            dropped |= event["event"] == zmq.EVENT_DISCONNECTED

    def _lose_peer(self, peer: PrefillPeer, why: str) -> None:
        """The tasks sent to `peer` are lost: end those requests; its writes stopped with it."""
        lost = self.transfers.lose_peer(peer.endpoint, self.engine.clock())
        self._settled(lost, f"{why}; the request's KV never arrived", "prefill_lost", retry=True)

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

    # --- ending requests ---------------------------------------------------------------

    def fail(self, request_id: str, error: str, retry: bool = False) -> None:
        if self._cancel(request_id) is not None:
            self.metrics.on_transfer_failed("prefill_failed")
        self._end(request_id, error, retry)

    def _cancel(self, request_id: str) -> Transfer | None:
        """Cancel the request's transfer, if it has one; a prefill that has its task is told to stop."""
        transfer = self.transfers.cancel(request_id, self.engine.clock())
        if transfer is not None and transfer.peer:
            self._send(self.peers[transfer.peer], AbortPrefill(transfer.transfer_id))
        return transfer

    def _settled(self, transfers: list[Transfer], error: str, reason: str, retry: bool = False) -> None:
        """End the requests of failed transfers with `error` (counted as `reason`); the requests of released
        ones ended earlier: their blocks go back."""
        for transfer in transfers:
            if transfer.outcome == "failed":
                self.metrics.on_transfer_failed(reason)
                self._end(transfer.request_id, error, retry)
            else:
                self._release(transfer.request_id)

    def _end(self, request_id: str, error: str, retry: bool = False) -> None:
        super().fail(request_id, error, retry)
        self._release(request_id)

    def _release(self, request_id: str) -> None:
        """Free the blocks a finished request holds, unless a late write may still land in them."""
        if not self.transfers.holds_blocks(request_id):
            self.scheduler.release(request_id)
