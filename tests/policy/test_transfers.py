"""The decode side's transfer state machine (pdlab/policy/transfers.py): examples, then random interleavings
of every event against its invariants."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pdlab.policy.transfers import Transfer, Transfers

TIMEOUT_S = 10.0


def in_flight(transfers: Transfers, request_id: str, protocol: str = "ipc", peer: str = "p", now_s: float = 0.0
              ) -> Transfer:
    transfers.reserve(request_id, protocol, now_s)
    return transfers.dispatched(request_id, peer, now_s)


# --- examples ------------------------------------------------------------------------------------------


def test_each_reservation_gets_a_transfer_id_of_its_own_even_when_the_request_id_comes_back():
    transfers = Transfers(TIMEOUT_S)
    first = transfers.reserve("a", "tcp", 0.0)
    transfers.cancel("a", 1.0)
    second = transfers.reserve("a", "tcp", 1.0)
    assert first.transfer_id == "a/1" and second.transfer_id == "a/2"
    assert transfers.undispatched() == [second]
    with pytest.raises(ValueError):
        transfers.reserve("a", "tcp", 2.0)


def test_a_delivered_transfer_settles_once_and_its_late_messages_count_no_more():
    transfers = Transfers(TIMEOUT_S)
    t = in_flight(transfers, "a", "tcp")
    assert transfers.receiving(t.transfer_id) is t
    assert transfers.done(t.transfer_id) is t and t.outcome == "delivered"
    assert transfers.done(t.transfer_id) is None and transfers.failed(t.transfer_id) is None
    assert transfers.receiving(t.transfer_id) is None and transfers.peer("p").num_outstanding == 0


def test_an_ipc_transfer_aborted_mid_flight_holds_its_blocks_until_the_prefill_says_it_stopped():
    transfers = Transfers(TIMEOUT_S)
    t = in_flight(transfers, "a", "ipc")
    assert transfers.cancel("a", 1.0) is t and t.state == "quarantined" and t.peer == "p"
    assert transfers.holds_blocks("a") and transfers.receiving(t.transfer_id) is None
    assert transfers.cancel("a", 2.0) is None, "cancelled once"
    assert transfers.expire(1.0 + TIMEOUT_S) == [], "not before the timeout"
    assert transfers.failed(t.transfer_id) is t and t.outcome == "released"
    assert not transfers.holds_blocks("a") and transfers.peer("p").num_outstanding == 0


def test_a_quarantine_ends_after_the_timeout_or_when_the_peer_is_lost():
    transfers = Transfers(TIMEOUT_S)
    a, b = in_flight(transfers, "a", "rdma"), in_flight(transfers, "b", "ipc", peer="q")
    transfers.cancel("a", 1.0), transfers.cancel("b", 1.0)
    assert transfers.expire(1.0 + TIMEOUT_S) == []
    assert transfers.lose_peer("q", 2.0) == [b] and b.outcome == "released"
    assert transfers.expire(1.0 + TIMEOUT_S + 0.1) == [a] and a.outcome == "released"
    assert not transfers.holds_blocks("a") and not transfers.holds_blocks("b")


def test_tcp_and_undispatched_transfers_are_cancelled_at_once():
    transfers = Transfers(TIMEOUT_S)
    t = in_flight(transfers, "a", "tcp")
    u = transfers.reserve("b", "ipc", 0.0)
    assert transfers.cancel("a", 1.0) is t and t.outcome == "cancelled" and t.peer == "p"
    assert transfers.cancel("b", 1.0) is u and u.outcome == "cancelled" and u.peer == ""
    assert not transfers.holds_blocks("a") and not transfers.holds_blocks("b")


def test_a_late_message_of_an_aborted_transfer_never_touches_the_request_that_reuses_its_id():
    transfers = Transfers(TIMEOUT_S)
    old = in_flight(transfers, "x", "ipc")
    transfers.cancel("x", 1.0)
    new = in_flight(transfers, "x", "ipc", now_s=1.0)
    assert transfers.done(old.transfer_id) is old and old.outcome == "released"
    assert new.state == "in_flight" and transfers.receiving(new.transfer_id) is new
    assert transfers.failed(old.transfer_id) is None and new.state == "in_flight"


def test_an_undispatched_transfer_is_given_up_after_the_timeout():
    transfers = Transfers(TIMEOUT_S)
    t = transfers.reserve("a", "tcp", 0.0)
    assert transfers.expire(TIMEOUT_S) == []
    assert transfers.expire(TIMEOUT_S + 0.1) == [t] and t.outcome == "failed"
    assert transfers.undispatched() == []


def test_a_slow_peer_that_answers_heartbeats_is_waited_for_and_a_silent_one_is_lost():
    transfers = Transfers(TIMEOUT_S)
    transfers.heard_from("p", "run-1", 0.0)  # answered long before its first task
    t = in_flight(transfers, "a", "tcp", now_s=100.0)
    assert transfers.silent_peers(100.0 + TIMEOUT_S) == [], "counted from when it became busy"
    for now_s in range(101, 200, 5):  # slower than the timeout, answering heartbeats
        transfers.heard_from("p", "run-1", float(now_s))
        assert transfers.silent_peers(float(now_s)) == []
    assert t.state == "in_flight"
    assert transfers.silent_peers(196.0 + TIMEOUT_S + 0.1) == ["p"]
    assert transfers.lose_peer("p", 300.0) == [t] and t.outcome == "failed"
    assert transfers.silent_peers(1000.0) == [], "an idle peer is never silent"


def test_a_restarted_peer_loses_the_tasks_sent_before_its_predecessor_last_answered():
    transfers = Transfers(TIMEOUT_S)
    early = in_flight(transfers, "a", "tcp", now_s=0.0)
    assert transfers.heard_from("p", "run-1", 0.5) == []
    assert transfers.heard_from("p", "run-1", 1.0) == [], "the same process"
    late = in_flight(transfers, "b", "tcp", now_s=2.0)  # went to the new process
    assert transfers.heard_from("p", "run-2", 3.0) == [early] and early.outcome == "failed"
    assert late.state == "in_flight" and transfers.peer("p").num_outstanding == 1


def test_missing_kv_names_the_short_layers_or_the_lost_frames():
    t = Transfer("a", "a/1", "tcp", 0.0)
    for layer in (0, 1):
        t.record_frame(layer, [4, 5])
    assert t.missing_kv({4, 5}, 2, 2) == ""
    assert t.missing_kv({4, 5}, 2, -1) == ""
    assert t.missing_kv({4, 5, 6}, 2, 2) == "layers [0, 1] of the prompt's blocks never arrived"
    assert t.missing_kv({4, 5}, 3, 2) == "layers [2] of the prompt's blocks never arrived"
    assert t.missing_kv({4, 5}, 2, 3) == "2 of the 3 KV frames the prefill sent arrived"
    assert Transfer("a", "a/1", "ipc", 0.0).missing_kv({4}, 2, 7) == "", "the prefill wrote the cache itself"


# --- random interleavings ------------------------------------------------------------------------------

REQUEST_IDS = ("a", "b", "c")
PEERS = ("p", "q")
PROTOCOLS = ("tcp", "ipc", "rdma")


@dataclass
class Seen:
    """What the test knows of one transfer, apart from the machine."""

    transfer: Transfer
    writing: bool = False  # an ipc/rdma prefill has its task and has not stopped
    cancelled_s: float | None = None
    outcomes: tuple[str, ...] = ()  # as the events that settled it returned them


class TransferEvents(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.transfers = Transfers(TIMEOUT_S)
        self.now_s = 0.0
        self.seen: dict[str, Seen] = {}  # every transfer ever reserved, by transfer id
        self.incarnations = {peer: 0 for peer in PEERS}
        self.answered_s: dict[str, float] = {}  # each peer's last heartbeat answer

    # --- helpers ---

    def may_write(self, s: Seen) -> bool:
        """Whether a late write of its prefill may still land: it has not stopped, and (if cancelled) the
        quarantine timeout has not passed."""
        return s.writing and (s.cancelled_s is None or self.now_s <= s.cancelled_s + TIMEOUT_S)

    def settled(self, transfers: list[Transfer], allowed: set[str]) -> None:
        for t in transfers:
            s = self.seen[t.transfer_id]
            assert t.state == "settled" and t.outcome in allowed, (t, allowed)
            s.outcomes += (t.outcome,)
            assert len(s.outcomes) == 1, f"{t.transfer_id} settled twice: {s.outcomes}"

    def states(self) -> dict[str, tuple]:
        return {tid: (s.transfer.state, s.transfer.outcome) for tid, s in self.seen.items()}

    def lost(self, peer: str, transfers: list[Transfer]) -> None:
        """`peer` is gone: none of its transfers may stay, and it writes no more."""
        for t in transfers:
            assert t.peer == peer
            self.seen[t.transfer_id].writing = False
        self.settled([t for t in transfers if t.outcome == "failed"], {"failed"})
        self.settled([t for t in transfers if t.outcome != "failed"], {"released"})

    def any_transfer(self, i: int) -> Seen:
        return list(self.seen.values())[i % len(self.seen)]

    # --- events ---

    @rule(request_id=st.sampled_from(REQUEST_IDS), protocol=st.sampled_from(PROTOCOLS))
    def reserve(self, request_id: str, protocol: str) -> None:
        if request_id in self.transfers.live:  # the engine refuses a request id in use
            return
        t = self.transfers.reserve(request_id, protocol, self.now_s)
        assert t.transfer_id not in self.seen, "transfer ids are never reused"
        self.seen[t.transfer_id] = Seen(t)

    @precondition(lambda self: self.transfers.undispatched())
    @rule(i=st.integers(0, 10), peer=st.sampled_from(PEERS))
    def dispatch(self, i: int, peer: str) -> None:
        waiting = self.transfers.undispatched()
        t = self.transfers.dispatched(waiting[i % len(waiting)].request_id, peer, self.now_s)
        self.seen[t.transfer_id].writing = t.protocol != "tcp"

    @precondition(lambda self: self.seen)
    @rule(i=st.integers(0, 50))
    def kv_frame(self, i: int) -> None:
        """A tcp frame, perhaps late: written only into the blocks of a transfer still in flight."""
        s = self.any_transfer(i)
        before = self.states()
        t = self.transfers.receiving(s.transfer.transfer_id)
        assert (t is s.transfer) == (s.transfer.state == "in_flight"), s.transfer
        assert self.states() == before

    @precondition(lambda self: self.seen)
    @rule(i=st.integers(0, 50), how=st.sampled_from(["done", "failed"]))
    def prefill_reports(self, i: int, how: str) -> None:
        """PrefillDone or PrefillFailed under a transfer id: only that transfer may change."""
        s = self.any_transfer(i)
        was = s.transfer.state
        before = self.states()
        t = (self.transfers.done if how == "done" else self.transfers.failed)(s.transfer.transfer_id)
        if was in ("in_flight", "quarantined"):
            assert t is s.transfer
            s.writing = False  # it reports only once it stopped writing
            ok = {"released"} if was == "quarantined" else {"delivered" if how == "done" else "failed"}
            self.settled([t], ok)
        else:
            assert t is None, f"a {was} transfer took a {how}"
        after = self.states()
        assert {tid for tid in after if after[tid] != before[tid]} <= {s.transfer.transfer_id}

    @rule(request_id=st.sampled_from(REQUEST_IDS))
    def cancel(self, request_id: str) -> None:
        live = self.transfers.live.get(request_id)
        was = live.state if live is not None else None
        t = self.transfers.cancel(request_id, self.now_s)
        assert t is live
        if t is None:
            return
        if was == "in_flight" and t.protocol != "tcp":
            assert t.state == "quarantined" and self.transfers.holds_blocks(request_id)
            self.seen[t.transfer_id].cancelled_s = self.now_s
        else:
            self.settled([t], {"cancelled"})

    @rule(peer=st.sampled_from(PEERS))
    def connection_dropped(self, peer: str) -> None:
        self.lost(peer, self.transfers.lose_peer(peer, self.now_s))
        assert not [s for s in self.seen.values() if s.transfer.peer == peer
                    and s.transfer.state in ("in_flight", "quarantined")], "a lost peer's transfers all end"

    @rule(peer=st.sampled_from(PEERS), restarted=st.booleans())
    def pong(self, peer: str, restarted: bool) -> None:
        self.incarnations[peer] += restarted
        last_s = self.answered_s.get(peer)
        lost = self.transfers.heard_from(peer, f"run-{self.incarnations[peer]}", self.now_s)
        if not restarted or last_s is None:
            assert lost == []
        for t in lost:
            assert t.dispatched_s < last_s, "only tasks sent before its predecessor last answered"
        self.lost(peer, lost)
        self.answered_s[peer] = self.now_s

    @rule(dt_s=st.sampled_from([0.5, 3.0, TIMEOUT_S, TIMEOUT_S + 1.0]))
    def time_passes(self, dt_s: float) -> None:
        self.now_s += dt_s
        expired = self.transfers.expire(self.now_s)
        for t in expired:
            s = self.seen[t.transfer_id]
            if t.outcome == "released":
                assert self.now_s > s.cancelled_s + TIMEOUT_S, "released before the prefill could have stopped"
            else:
                assert t.peer == "" and self.now_s > t.deadline_s, "only undispatched transfers are given up"
        self.settled([t for t in expired if t.outcome == "failed"], {"failed"})
        self.settled([t for t in expired if t.outcome != "failed"], {"released"})
        for peer in self.transfers.silent_peers(self.now_s):
            assert self.now_s - self.answered_s.get(peer, float("-inf")) > TIMEOUT_S, "it answered in time"
            self.lost(peer, self.transfers.lose_peer(peer, self.now_s))

    # --- invariants ---

    @invariant()
    def no_block_is_reusable_while_a_late_write_may_land(self) -> None:
        for s in self.seen.values():
            if self.may_write(s):
                assert s.transfer.state in ("in_flight", "quarantined"), s.transfer
                if s.transfer.state == "quarantined":
                    assert self.transfers.holds_blocks(s.transfer.request_id)

    @invariant()
    def tcp_transfers_never_quarantine(self) -> None:
        for s in self.seen.values():
            assert not (s.transfer.protocol == "tcp" and s.transfer.state == "quarantined"), s.transfer

    @invariant()
    def the_books_agree(self) -> None:
        quarantined = {s.transfer.request_id for s in self.seen.values() if s.transfer.state == "quarantined"}
        assert {r for r in REQUEST_IDS if self.transfers.holds_blocks(r)} == quarantined
        for s in self.seen.values():
            assert (s.transfer.state == "settled") == (len(s.outcomes) == 1), s
        for peer in PEERS:
            owed = [s for s in self.seen.values() if s.transfer.peer == peer
                    and s.transfer.state in ("in_flight", "quarantined")]
            assert self.transfers.peer(peer).num_outstanding == len(owed)

    def teardown(self) -> None:
        """Every transfer ends, once: the prefills go, the timeout passes."""
        for peer in PEERS:
            self.connection_dropped(peer)
        self.time_passes(TIMEOUT_S + 1.0)
        assert not self.transfers.live and not self.transfers.sent
        for s in self.seen.values():
            assert s.transfer.state == "settled" and len(s.outcomes) == 1, s


TransferEvents.TestCase.settings = settings(max_examples=500, stateful_step_count=50, deadline=None)
test_random_interleavings_keep_the_invariants = TransferEvents.TestCase
