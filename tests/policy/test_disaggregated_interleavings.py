"""The scheduler's decode side under random interleavings of every operation the cluster layer may call:
no block leaks, reservation in arrival order, and every request finishes."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pdlab.policy.block_manager import BlockManager
from pdlab.policy.request import Request, RequestStatus
from pdlab.policy.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from tests.policy.disaggregation import BLOCK_SIZE, EOS, req, snapshot


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
