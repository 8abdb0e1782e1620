"""The scheduler's disaggregation paths: decode-side reservation and transfer, held blocks on either side."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdlab.policy.block_manager import BlockManager
from pdlab.policy.request import Request, RequestStatus
from pdlab.policy.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from pdlab.sampling_params import SamplingParams

EOS = 0
BLOCK_SIZE = 4


def make_scheduler(num_blocks: int = 16, max_num_seqs: int = 8, budget: int = 64, chunked: bool = True,
                   max_model_len: int = 64) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                             enable_chunked_prefill=chunked, max_model_len=max_model_len)
    return Scheduler(config, BlockManager(num_blocks, BLOCK_SIZE))


def req(rid: str, prompt_len: int, max_tokens: int = 8, keep: bool = False, ignore_eos: bool = False) -> Request:
    return Request(rid, [7] * prompt_len, SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos),
                   eos_token_ids=(EOS,), keep_blocks_after_finish=keep)


def snapshot(scheduler: Scheduler, requests: list[Request]) -> tuple:
    """Everything an operation could change, to assert that one changed nothing."""
    return (
        [r.request_id for r in scheduler.waiting],
        [r.request_id for r in scheduler.running],
        [r.request_id for r in scheduler.reserving],
        list(scheduler.transferring),
        list(scheduler.held),
        sorted(scheduler.requests),
        scheduler.block_manager.num_free_blocks,
        [(r.status, r.num_computed_tokens, list(r.block_ids), list(r.output_token_ids), r.finish_reason)
         for r in requests],
    )


def step(scheduler: Scheduler, token: int, now_s: float) -> ScheduledBatch:
    batch = scheduler.schedule()
    scheduler.update(batch, {i.request.request_id: token for i in batch.items if i.sample}, now_s)
    return batch


# --- decode side: random interleavings ------------------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 12)),
        st.tuples(st.just("add_remote"), st.integers(1, 40), st.one_of(st.just(1), st.integers(1, 12))),
        st.tuples(st.just("add_remote"), st.integers(1, 40), st.integers(1, 12)),
        st.tuples(st.just("reserve"), st.just(0), st.just(0)),
        st.tuples(st.just("reserve"), st.just(0), st.just(0)),
        # b == 0: the first token is EOS.
        st.tuples(st.just("complete"), st.integers(0, 50), st.integers(0, 3)),
        st.tuples(st.just("complete"), st.integers(0, 50), st.integers(0, 3)),
        # complete_transfer of any request: a no-op unless it is transferring.
        st.tuples(st.just("complete_any"), st.integers(0, 50), st.integers(0, 3)),
        st.tuples(st.just("abort"), st.integers(0, 50), st.just(0)),
        st.tuples(st.just("abort_held_transfer"), st.integers(0, 50), st.just(0)),
        st.tuples(st.just("release"), st.integers(0, 50), st.just(0)),
        # b == 1: abort a request while the step runs; b == 2: a transfer lands while it runs.
        st.tuples(st.just("step"), st.integers(0, 50), st.integers(0, 4)),
        st.tuples(st.just("step"), st.integers(0, 50), st.integers(0, 4)),
    ),
    min_size=10,
    max_size=120,
)


class DecodeHarness:
    """Drives a decode-side scheduler and checks its state after every operation."""

    def __init__(self, config: SchedulerConfig, num_blocks: int, seed: int) -> None:
        self.config = config
        self.scheduler = Scheduler(config, BlockManager(num_blocks, BLOCK_SIZE))
        self.rng = random.Random(seed)
        self.all_requests: list[Request] = []
        self.remote_ids: set[str] = set()
        self.now = 0.0

    @property
    def bm(self) -> BlockManager:
        return self.scheduler.block_manager

    def pick(self, ids, i: int) -> str | None:
        ids = sorted(ids)
        return ids[i % len(ids)] if ids else None

    def token(self, eos: bool) -> int:
        return EOS if eos else self.rng.randrange(1, 100)

    def add(self, prompt_len: int, max_tokens: int, remote: bool) -> None:
        prompt_len = min(prompt_len, self.config.max_model_len - 1)
        r = req(f"{'R' if remote else 'L'}{len(self.all_requests)}", prompt_len, max_tokens)
        self.all_requests.append(r)
        if remote:
            self.remote_ids.add(r.request_id)
            self.scheduler.add_remote(r)
        else:
            self.scheduler.add(r)

    def reserve(self) -> None:
        s = self.scheduler
        before = [r.request_id for r in s.reserving]
        reserved = s.reserve()
        k = len(reserved)
        # FIFO: the reserved ones are the head of the queue, and the rest wait in order.
        assert [r.request_id for r in reserved] == before[:k]
        assert [r.request_id for r in s.reserving] == before[k:]
        for r in reserved:
            assert r.status is RequestStatus.TRANSFERRING and r.request_id in s.transferring
            assert len(r.block_ids) == self.bm.num_blocks_for(r.num_prompt_tokens)
        if reserved:
            assert len(s.running) + len(s.transferring) <= self.config.max_num_seqs, "reserve overran max_num_seqs"
        if s.reserving:  # the head waits only for a reason
            head = s.reserving[0]
            assert (len(s.running) + len(s.transferring) >= self.config.max_num_seqs
                    or not self.bm.can_allocate(head, head.num_prompt_tokens))

    def complete(self, rid: str | None, eos: bool) -> None:
        s = self.scheduler
        if rid is None:
            return
        transferring = rid in s.transferring
        before = snapshot(s, self.all_requests)
        r = s.complete_transfer(rid, self.token(eos), self.now)
        if not transferring:
            assert r is None
            assert snapshot(s, self.all_requests) == before, "complete_transfer of a non-transferring id changed state"
            return
        assert r is not None and r.num_output_tokens == 1 and r.first_token_time_s == self.now
        if r.is_finished:
            assert r.finish_reason == ("stop" if eos else "length")
        else:
            assert r.status is RequestStatus.RUNNING and r.num_computed_tokens == r.num_prompt_tokens
            assert r.num_uncomputed_tokens == 1

    def abort_held_transfer(self, i: int) -> None:
        s = self.scheduler
        rid = self.pick(s.transferring, i)
        if rid is None:
            return
        r = s.transferring[rid]
        r.keep_blocks_after_finish = True
        blocks = list(r.block_ids)
        assert s.abort(rid, self.now) is r
        assert r.is_finished and r.finish_reason == "abort" and s.held[rid] is r
        assert r.block_ids == blocks and all(self.bm.owner(b) == rid for b in blocks), "held blocks were freed"
        # The late transfer lands after the abort: ignored, the blocks stay held.
        assert s.complete_transfer(rid, 5, self.now) is None
        assert s.held[rid] is r and r.num_output_tokens == 0

    def release(self, i: int) -> None:
        s = self.scheduler
        rid = self.pick(s.held, i)
        if rid is None:
            return
        r = s.held[rid]
        num_free = self.bm.num_free_blocks + len(r.block_ids)
        assert s.release(rid) is r
        assert r.block_ids == [] and self.bm.num_free_blocks == num_free
        assert s.release(rid) is None

    def step(self, i: int, event: int) -> ScheduledBatch:
        s = self.scheduler
        batch = s.schedule()
        self.check_batch(batch)
        if event == 1 and self.all_requests:  # abort while the step runs: update skips it
            s.abort(self.all_requests[i % len(self.all_requests)].request_id, self.now)
        elif event == 2:
            self.complete(self.pick(s.transferring, i), eos=False)
        sampled = {item.request.request_id: self.token(self.rng.random() < 0.05) for item in batch.items if item.sample}
        self.now += 1.0
        s.update(batch, sampled, self.now)
        return batch

    def check_batch(self, batch: ScheduledBatch) -> None:
        assert batch.num_batched_tokens <= self.config.max_num_batched_tokens
        assert len({item.request.request_id for item in batch.items}) == len(batch.items)
        for item in batch.items:
            r = item.request
            assert r.status is RequestStatus.RUNNING
            assert item.start == r.num_computed_tokens and item.num_tokens >= 1
            assert len(r.block_ids) * BLOCK_SIZE >= item.start + item.num_tokens, "scheduled tokens without blocks"
            if r.request_id in self.remote_ids and r.num_preemptions == 0:
                assert item.start >= r.num_prompt_tokens, f"{r.request_id}: transferred prompt recomputed"

    def check_state(self) -> None:
        s = self.scheduler
        self.bm.check_invariants(s.live_requests())
        queues = {
            RequestStatus.WAITING: [r.request_id for r in s.waiting],
            RequestStatus.RUNNING: [r.request_id for r in s.running],
            RequestStatus.RESERVING: [r.request_id for r in s.reserving],
            RequestStatus.TRANSFERRING: list(s.transferring),
        }
        in_queues = [rid for ids in queues.values() for rid in ids]
        assert len(in_queues) == len(set(in_queues)), "a request is in two queues"
        assert set(in_queues) == set(s.requests), "the request table disagrees with the queues"
        assert not set(s.requests) & set(s.held)
        for status, ids in queues.items():
            for rid in ids:
                r = s.requests[rid]
                assert r.status is status and not r.is_finished
                if status in (RequestStatus.WAITING, RequestStatus.RESERVING):
                    assert r.num_computed_tokens == 0 and r.block_ids == []
                if status is RequestStatus.TRANSFERRING:
                    assert r.num_output_tokens == 0
                    assert len(r.block_ids) == self.bm.num_blocks_for(r.num_prompt_tokens)
                if status is RequestStatus.RUNNING:
                    assert len(r.block_ids) * BLOCK_SIZE >= r.num_computed_tokens
                    assert r.num_uncomputed_tokens >= 1
        assert len(s.running) + len(s.transferring) <= s.config.max_num_seqs, "sequence slots overrun"
        for r in s.held.values():
            assert r.is_finished and r.keep_blocks_after_finish
        for r in self.all_requests:
            if r.request_id not in s.requests and r.request_id not in s.held:
                assert r.is_finished and r.block_ids == []

    def drain(self) -> None:
        s = self.scheduler
        for _ in range(10_000):
            s.reserve()
            for rid in list(s.transferring):
                self.complete(rid, eos=self.rng.random() < 0.1)
            for rid in list(s.held):
                s.release(rid)
            self.check_state()
            if not s.has_unfinished() and not s.held:
                return
            self.step(0, 0)
            self.check_state()
        raise AssertionError("requests left unfinished: the scheduler stalled")


@settings(max_examples=200, deadline=None)
@given(
    ops=ops,
    chunked=st.booleans(),
    num_blocks=st.integers(8, 24),
    budget=st.integers(1, 64),
    max_num_seqs=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_decode_side_no_leak_fifo_reservation_and_everything_finishes(ops, chunked, num_blocks, budget, max_num_seqs, seed):
    max_model_len = min(num_blocks * BLOCK_SIZE, 64)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget if chunked else max(budget, max_model_len),
                             enable_chunked_prefill=chunked, max_model_len=max_model_len)
    h = DecodeHarness(config, num_blocks, seed)
    s = h.scheduler
    for op, a, b in ops:
        if op in ("add", "add_remote"):
            h.add(a, b, remote=op == "add_remote")
        elif op == "reserve":
            h.reserve()
        elif op == "complete":
            h.complete(h.pick(s.transferring, a), eos=b == 0)
        elif op == "complete_any" and h.all_requests:
            h.complete(h.all_requests[a % len(h.all_requests)].request_id, eos=b == 0)
        elif op == "abort" and h.all_requests:
            r = h.all_requests[a % len(h.all_requests)]
            held, unfinished = r.request_id in s.held, r.request_id in s.requests
            got = s.abort(r.request_id, h.now)
            assert got is (r if unfinished else None)
            if unfinished:
                assert r.finish_reason == "abort"
            if held:  # only `release` frees what a transfer may still use
                assert s.held[r.request_id] is r
        elif op == "abort_held_transfer":
            h.abort_held_transfer(a)
        elif op == "release":
            h.release(a)
        elif op == "step":
            h.step(a, b)
        h.check_state()

    h.drain()
    assert h.bm.num_free_blocks == num_blocks, "blocks leaked"
    assert not (s.reserving or s.transferring or s.held or s.running or s.waiting)
    for r in h.all_requests:
        assert r.is_finished and r.block_ids == []
        assert r.finish_reason in ("stop", "length", "abort")
        if r.finish_reason == "stop":
            assert r.output_token_ids[-1] == EOS
        if r.finish_reason == "length":
            assert r.num_output_tokens == r.params.max_tokens or r.num_tokens == max_model_len
        if r.finish_reason != "abort":
            assert len(r.token_times_s) == r.num_output_tokens >= 1


# --- prefill side: held blocks --------------------------------------------------------------


@pytest.mark.parametrize("chunked", [True, False])
def test_prefill_side_holds_blocks_after_the_first_token_until_release(chunked):
    s = make_scheduler(num_blocks=6, chunked=chunked)
    bm = s.block_manager
    a, b, c = req("a", 8, max_tokens=1, keep=True), req("b", 5, max_tokens=1, keep=True), req("c", 3, max_tokens=1, keep=True)
    for r in (a, b, c):
        s.add(r)
    batch = s.schedule()
    assert batch.signature() == (("a", 0, 8), ("b", 0, 5), ("c", 0, 3))
    s.update(batch, {"a": 11, "b": EOS, "c": 13}, 1.0)
    assert a.finish_reason == "length" and b.finish_reason == "stop" and c.finish_reason == "length"
    assert list(s.held) == ["a", "b", "c"] and not s.has_unfinished() and not s.has_work()
    for r in (a, b, c):
        assert r.is_finished and r.block_ids and all(bm.owner(block) == r.request_id for block in r.block_ids)
    assert bm.num_free_blocks == 6 - 5
    bm.check_invariants(s.live_requests())
    with pytest.raises(ValueError, match="duplicate"):
        s.add(req("a", 4))  # its KV is still being read: the id is taken

    # A new request waits for blocks the held ones still own.
    d = req("d", 8, max_tokens=1)
    s.add(d)
    assert step(s, 9, 2.0).signature() == ()
    assert s.release("a") is a and a.block_ids == [] and bm.num_free_blocks == 3
    assert s.release("a") is None
    bm.check_invariants(s.live_requests())
    assert step(s, 9, 3.0).signature() == (("d", 0, 8),) and d.finish_reason == "length"

    # Abort of a held request changes nothing: only `release` frees what a transfer may still use.
    assert s.abort("b", 4.0) is None and s.held["b"] is b and b.block_ids and b.finish_reason == "stop"
    assert s.release("b") is b and b.block_ids == []
    assert s.release("c") is c
    assert bm.num_free_blocks == 6 and not s.held
    bm.check_invariants(s.live_requests())


def test_prefill_side_abort_of_a_running_request_with_keep_blocks_holds_them():
    # The abort may race a KV push that is still reading its blocks.
    s = make_scheduler(num_blocks=8, budget=4)
    r = req("a", 10, max_tokens=1, keep=True)
    s.add(r)
    step(s, 9, 1.0)  # first chunk: 4 of 10 tokens
    assert r.status is RequestStatus.RUNNING and len(r.block_ids) == 1
    assert s.abort("a", 2.0) is r and r.finish_reason == "abort" and s.held["a"] is r and len(r.block_ids) == 1
    s.block_manager.check_invariants(s.live_requests())
    assert s.abort("a", 3.0) is None and s.held["a"] is r  # a second abort frees nothing
    assert s.release("a") is r and r.block_ids == [] and s.block_manager.num_free_blocks == 8


# --- decode side: units --------------------------------------------------------------------


def test_reservation_waits_for_blocks_in_order_and_drops_nothing():
    s = make_scheduler(num_blocks=4)
    a, b, c, d = req("a", 8, max_tokens=2), req("b", 4, max_tokens=2), req("c", 8), req("d", 1)
    for r in (a, b, c, d):
        s.add_remote(r)
    assert [r.request_id for r in s.reserve()] == ["a", "b"]
    # d would fit the one free block, but c is ahead of it.
    assert [r.request_id for r in s.reserving] == ["c", "d"] and s.block_manager.num_free_blocks == 1
    assert s.reserve() == [] and [r.request_id for r in s.reserving] == ["c", "d"]
    assert all(r.status is RequestStatus.RESERVING and not r.block_ids for r in (c, d))

    assert s.complete_transfer("b", 5, 1.0) is b
    assert s.reserve() == []  # b still owns its block (and now needs a second for its next token)
    step(s, 6, 2.0)  # b decodes its second and last token
    assert b.finish_reason == "length" and s.block_manager.num_free_blocks == 2
    assert [r.request_id for r in s.reserve()] == ["c"] and [r.request_id for r in s.reserving] == ["d"]
    assert s.complete_transfer("a", EOS, 3.0) is a and a.finish_reason == "stop"
    assert [r.request_id for r in s.reserve()] == ["d"] and not s.reserving
    s.block_manager.check_invariants(s.live_requests())


def test_reservation_counts_transferring_and_running_against_max_num_seqs():
    s = make_scheduler(num_blocks=32, max_num_seqs=2)
    for rid in "abc":
        s.add_remote(req(rid, 4, max_tokens=2))
    assert [r.request_id for r in s.reserve()] == ["a", "b"]
    assert s.complete_transfer("a", 5, 1.0).status is RequestStatus.RUNNING
    assert s.reserve() == [] and [r.request_id for r in s.reserving] == ["c"]  # one running, one transferring
    step(s, 6, 2.0)  # a finishes
    assert [r.request_id for r in s.reserve()] == ["c"]


def test_complete_transfer_of_an_id_that_is_not_transferring_returns_none_and_changes_nothing():
    s = make_scheduler(num_blocks=6)
    done, aborted, running, waiting_blocks = req("done", 4, 1), req("aborted", 4), req("running", 4), req("reserving", 16)
    everyone = [done, aborted, running, waiting_blocks]
    for r in everyone:
        s.add_remote(r)
    assert [r.request_id for r in s.reserve()] == ["done", "aborted", "running"]
    s.complete_transfer("done", 5, 1.0)
    s.abort("aborted", 1.0)
    s.complete_transfer("running", 5, 1.0)
    assert done.is_finished and aborted.is_finished and running.status is RequestStatus.RUNNING
    before = snapshot(s, everyone)
    for rid in ("unknown", "done", "aborted", "running", "reserving"):
        assert s.complete_transfer(rid, 9, 2.0) is None, rid
        assert snapshot(s, everyone) == before, rid
    assert running.output_token_ids == [5], "a duplicate transfer completion appended a token"


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("prompt_len", [7, 8])  # the first decode token fits the last block / needs a new one
def test_first_decode_step_after_a_transfer_computes_one_token_at_the_prompt_end(chunked, prompt_len):
    s = make_scheduler(num_blocks=8, chunked=chunked)
    r = req("r", prompt_len, max_tokens=3, ignore_eos=True)
    s.add_remote(r)
    assert s.reserve() == [r] and len(r.block_ids) == s.block_manager.num_blocks_for(prompt_len)
    assert s.complete_transfer("r", 5, 1.0) is r
    assert r.num_computed_tokens == prompt_len and r.output_token_ids == [5] and r.token_times_s == [1.0]
    batch = s.schedule()
    assert batch.signature() == (("r", prompt_len, 1),), "the transferred prompt was recomputed"
    assert batch.kind == "decode" and batch.items[0].sample
    assert len(r.block_ids) == s.block_manager.num_blocks_for(prompt_len + 1)
    s.update(batch, {"r": 6}, 2.0)
    assert r.num_computed_tokens == prompt_len + 1 and r.output_token_ids == [5, 6]
    assert step(s, 7, 3.0).signature() == (("r", prompt_len + 1, 1),)
    assert r.finish_reason == "length" and s.block_manager.num_free_blocks == 8


@pytest.mark.parametrize("first_token, reason", [(EOS, "stop"), (5, "length")])
def test_a_transfer_may_finish_the_request_at_once(first_token, reason):
    s = make_scheduler(num_blocks=4)
    r = req("r", 6, max_tokens=1 if reason == "length" else 8)
    s.add_remote(r)
    s.reserve()
    assert s.complete_transfer("r", first_token, 1.0) is r
    assert r.finish_reason == reason and r.finish_time_s == 1.0 and not s.running and not s.has_unfinished()
    assert s.block_manager.num_free_blocks == 4


def test_local_admission_respects_sequence_slots_reserved_for_transfers():
    s = make_scheduler(max_num_seqs=1)
    s.add_remote(req("remote", 4, ignore_eos=True))
    assert [r.request_id for r in s.reserve()] == ["remote"]  # the only slot
    s.add(req("local", 4, ignore_eos=True))
    step(s, 5, 1.0)  # admits "local" although the slot is reserved
    s.complete_transfer("remote", 5, 2.0)
    assert len(s.running) <= s.config.max_num_seqs  # 2 > 1


def test_readmission_after_preemption_respects_sequence_slots_reserved_for_transfers():
    # The same overrun on a decode instance with remote requests only.
    s = make_scheduler(num_blocks=8, max_num_seqs=2)
    s.add_remote(req("x", 16, keep=True))
    s.reserve()
    s.abort("x", 0.0)  # held: a late transfer may still write its 4 blocks
    for rid in "ab":
        s.add_remote(req(rid, 4, max_tokens=20, ignore_eos=True))
    s.reserve()
    s.complete_transfer("a", 5, 0.0)
    s.complete_transfer("b", 5, 0.0)
    now = 1.0
    while not step(s, 5, now).preempted_ids:  # a and b grow until b is preempted
        now += 1
    s.add_remote(req("c", 4, ignore_eos=True))
    assert s.reserve()[0].request_id == "c"  # takes b's slot: 1 running + 1 transferring
    s.release("x")
    step(s, 5, now + 1)  # re-admits b: 2 running + 1 transferring
    s.complete_transfer("c", 5, now + 2)
    assert len(s.running) <= s.config.max_num_seqs  # 3 > 2
