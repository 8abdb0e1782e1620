"""A decode instance's KV transfers: who may still write a request's blocks, and when they may be reused.

Standard library only. `pdlab/cluster/decode.py` drives it: it tells each
event, and does what the answer asks (sends a task, an `AbortPrefill` or a
`KVAck`, ends a request, frees its blocks). Times are floats from the driver.

A request whose prompt another instance computes gets one transfer once its
blocks are reserved:

    undispatched --dispatched--> in_flight --done--------------------> settled: delivered
        |                            |------failed, peer lost------> settled: failed
        |                            |------cancel (tcp)-----------> settled: cancelled
        |                            '------cancel (ipc, rdma)--> quarantined
        |--give up (timeout)---> settled: failed                        |
        '--cancel--------------> settled: cancelled                     |
                          settled: released <--done, failed, peer lost, timeout

- undispatched: blocks reserved, no prefill took the task yet; given up on
  after `timeout_s`.
- in_flight: the task went to a prefill under the transfer's id
  (`{request id}/{n}`, never reused), and only messages carrying that id
  count: a late message of an earlier transfer never counts for a request
  that reuses the request id. No deadline: a prefill that answers heartbeats
  is waited for, however slow; one that stays silent for `timeout_s` while it
  owes transfers is lost, and so are they.
- quarantined: cancelled (its request aborted or failed) while the prefill
  writes straight into this instance's cache (ipc, rdma): a late write may
  still land, so the blocks stay held until the prefill says it stopped (its
  `PrefillDone` or `PrefillFailed`), it is lost (its writes stopped with it),
  or `timeout_s` passes. Over tcp the decode writes every frame itself and
  drops late ones: a cancelled tcp transfer settles at once.
- settled: terminal. Nothing a prefill sends about it counts any more.
  `outcome` says what the decode does: delivered (join the batch), failed
  (end the request with an error), cancelled (the request is being ended),
  released (the request ended earlier; its held blocks may go back now).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

State = Literal["undispatched", "in_flight", "quarantined", "settled"]
Outcome = Literal["delivered", "failed", "cancelled", "released"]


@dataclass
class Transfer:
    request_id: str
    transfer_id: str  # what the prefill's task and messages about it carry
    protocol: str
    deadline_s: float  # undispatched: give up; quarantined: release; in flight: none (inf)
    state: State = "undispatched"
    outcome: Outcome | None = None  # once settled
    peer: str = ""  # the prefill it went to, once dispatched
    dispatched_s: float = float("inf")
    num_frames: int = 0  # tcp: KV layer frames written
    covered: dict[int, set[int]] = field(default_factory=dict)  # tcp: layer -> blocks written

    def record_frame(self, layer: int, block_ids: Iterable[int]) -> None:
        self.num_frames += 1
        self.covered.setdefault(layer, set()).update(block_ids)

    def missing_kv(self, block_ids: set[int], num_layers: int, num_frames_sent: int) -> str:
        """What a delivered tcp transfer lacks ("": nothing): a layer of one of `block_ids` (the known
        tokens' blocks), or frames (the prefill sent `num_frames_sent`; negative: it did not say)."""
        if self.protocol != "tcp":
            return ""  # the prefill wrote the cache itself; it reports only once every write is done
        short = [layer for layer in range(num_layers) if not block_ids <= self.covered.get(layer, set())]
        if short:
            return f"layers {short} of the prompt's blocks never arrived"
        if num_frames_sent >= 0 and self.num_frames != num_frames_sent:
            return f"{self.num_frames} of the {num_frames_sent} KV frames the prefill sent arrived"
        return ""


@dataclass
class Peer:
    """A prefill instance as the transfers see it."""

    num_outstanding: int = 0  # transfers in flight or quarantined with it
    busy_since_s: float | None = None  # when num_outstanding last rose from 0
    last_seen_s: float | None = None  # its last heartbeat answer
    incarnation: str = ""  # of the process that answered it


class Transfers:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.live: dict[str, Transfer] = {}  # undispatched or in flight, by request id
        self.sent: dict[str, Transfer] = {}  # in flight or quarantined, by transfer id: whose messages count
        self.peers: dict[str, Peer] = {}
        self._num_transfers = 0

    # --- a request's transfer ----------------------------------------------------------

    def reserve(self, request_id: str, protocol: str, now_s: float) -> Transfer:
        """The request's blocks are reserved: its transfer waits for a prefill, until `now_s + timeout_s`."""
        if request_id in self.live:
            raise ValueError(f"request {request_id!r} already has a transfer")
        self._num_transfers += 1
        transfer = Transfer(request_id, f"{request_id}/{self._num_transfers}", protocol, now_s + self.timeout_s)
        self.live[request_id] = transfer
        return transfer

    def undispatched(self) -> list[Transfer]:
        """Transfers no prefill took yet, in the order their blocks were reserved."""
        return [t for t in self.live.values() if t.state == "undispatched"]

    def dispatched(self, request_id: str, peer: str, now_s: float) -> Transfer:
        """The request's task went to `peer` (the send succeeded)."""
        transfer = self.live[request_id]
        if transfer.state != "undispatched":
            raise ValueError(f"transfer {transfer.transfer_id} is {transfer.state}, not undispatched")
        transfer.state, transfer.peer, transfer.dispatched_s = "in_flight", peer, now_s
        transfer.deadline_s = float("inf")
        self.sent[transfer.transfer_id] = transfer
        state = self.peer(peer)
        if state.num_outstanding == 0:
            state.busy_since_s = now_s
        state.num_outstanding += 1
        return transfer

    def receiving(self, transfer_id: str) -> Transfer | None:
        """The in-flight transfer whose KV frames may be written now; None for any other id."""
        transfer = self.sent.get(transfer_id)
        return transfer if transfer is not None and transfer.state == "in_flight" else None

    def done(self, transfer_id: str) -> Transfer | None:
        """The prefill reports the transfer complete: delivered, or released if quarantined; None if it no
        longer counts. Either way the prefill may free its copy (ack it)."""
        transfer = self.sent.get(transfer_id)
        if transfer is None:
            return None
        return self._settle(transfer, "delivered" if transfer.state == "in_flight" else "released")

    def failed(self, transfer_id: str) -> Transfer | None:
        """The prefill reports it failed (and stopped writing): failed, or released if quarantined."""
        transfer = self.sent.get(transfer_id)
        if transfer is None:
            return None
        return self._settle(transfer, "failed" if transfer.state == "in_flight" else "released")

    def cancel(self, request_id: str, now_s: float) -> Transfer | None:
        """The request is ending (aborted, or failed here) while its KV is awaited: returns its transfer,
        cancelled, or quarantined for `timeout_s` when its prefill may still write into the blocks; None if
        it has none. A transfer with a `peer` was sent: tell the peer to stop."""
        transfer = self.live.get(request_id)
        if transfer is None:
            return None
        if transfer.state == "undispatched" or transfer.protocol == "tcp":
            return self._settle(transfer, "cancelled")
        del self.live[request_id]
        transfer.state, transfer.deadline_s = "quarantined", now_s + self.timeout_s
        return transfer

    def holds_blocks(self, request_id: str) -> bool:
        """Whether a late write may still land in the request's blocks (a quarantined transfer of it)."""
        return any(t.request_id == request_id and t.state == "quarantined" for t in self.sent.values())

    def expire(self, now_s: float) -> list[Transfer]:
        """Undispatched transfers past their deadline (failed) and quarantined ones (released)."""
        waiting = [t for t in self.live.values() if t.state == "undispatched" and now_s > t.deadline_s]
        held = [t for t in self.sent.values() if t.state == "quarantined" and now_s > t.deadline_s]
        return [self._settle(t, "failed") for t in waiting] + [self._settle(t, "released") for t in held]

    # --- prefill peers -------------------------------------------------------------------

    def peer(self, peer: str) -> Peer:
        return self.peers.setdefault(peer, Peer())

    def heard_from(self, peer: str, incarnation: str, now_s: float) -> list[Transfer]:
        """`peer` answered a heartbeat. If a new process answered, the tasks sent before the old one last
        answered went to it and are lost: returns their transfers, settled (see `lose_peer`)."""
        state = self.peer(peer)
        lost = []
        if state.incarnation and incarnation != state.incarnation and state.last_seen_s is not None:
            lost = self.lose_peer(peer, now_s, sent_before_s=state.last_seen_s)
        state.incarnation, state.last_seen_s = incarnation, now_s
        return lost

    def silent_peers(self, now_s: float) -> list[str]:
        """Peers that owe transfers and answered no heartbeat for `timeout_s` (counting from when they last
        became busy, so that a peer idle for long is not given up on at its first task)."""
        return [name for name, p in self.peers.items() if p.num_outstanding and now_s - max(
            p.last_seen_s if p.last_seen_s is not None else float("-inf"),
            p.busy_since_s if p.busy_since_s is not None else float("-inf")) > self.timeout_s]

    def lose_peer(self, peer: str, now_s: float, sent_before_s: float = float("inf")) -> list[Transfer]:
        """`peer` died or restarted: its transfers sent before `sent_before_s` are lost (failed), and its
        quarantined ones released (its writes stopped with it)."""
        gone = [t for t in self.sent.values() if t.peer == peer and t.dispatched_s < sent_before_s]
        settled = [self._settle(t, "failed" if t.state == "in_flight" else "released") for t in gone]
        state = self.peer(peer)
        state.busy_since_s = None if state.num_outstanding == 0 else now_s
        return settled

    def _settle(self, transfer: Transfer, outcome: Outcome) -> Transfer:
        if self.sent.pop(transfer.transfer_id, None) is not None:
            self.peers[transfer.peer].num_outstanding -= 1
        if self.live.get(transfer.request_id) is transfer:
            del self.live[transfer.request_id]
        transfer.state, transfer.outcome = "settled", outcome
        return transfer
