"""Random add / step / finish / abort sequences against the scheduler's invariants."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from pdlab.policy.block_manager import BlockManager
from pdlab.policy.request import Request, RequestStatus
from pdlab.policy.scheduler import Scheduler, SchedulerConfig
from pdlab.sampling_params import SamplingParams

EOS = 0

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 40), st.integers(1, 20)),
        st.tuples(st.just("step"), st.just(0), st.just(0)),
        st.tuples(st.just("abort"), st.integers(0, 50), st.just(0)),
    ),
    max_size=80,
)


def check(scheduler: Scheduler, batch, config: SchedulerConfig) -> None:
    live = list(scheduler.waiting) + scheduler.running
    scheduler.block_manager.check_invariants(live)
    assert batch.num_batched_tokens <= config.max_num_batched_tokens
    assert len(scheduler.running) <= config.max_num_seqs
    assert len({item.request.request_id for item in batch.items}) == len(batch.items)
    bs = scheduler.block_manager.block_size
    for item in batch.items:
        r = item.request
        assert r.status is RequestStatus.RUNNING
        assert item.start == r.num_computed_tokens and item.num_tokens >= 1
        assert len(r.block_ids) * bs >= item.start + item.num_tokens, "scheduled tokens without blocks"
        if not config.enable_chunked_prefill:
            assert item.sample, "without chunked prefill every item reaches its last token"
    for r in scheduler.waiting:
        assert r.status is RequestStatus.WAITING and r.num_computed_tokens == 0 and not r.block_ids
    if not config.enable_chunked_prefill:
        assert batch.kind in ("empty", "prefill", "decode"), "chunked prefill off never mixes phases"


@settings(max_examples=150, deadline=None)
@given(
    ops=ops,
    chunked=st.booleans(),
    num_blocks=st.integers(8, 24),
    budget=st.integers(1, 64),
    max_num_seqs=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_no_leak_no_overrun_and_everything_finishes(ops, chunked, num_blocks, budget, max_num_seqs, seed):
    block_size = 4
    max_model_len = min(num_blocks * block_size, 64)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget if chunked else max(budget, max_model_len),
                             enable_chunked_prefill=chunked, max_model_len=max_model_len)
    scheduler = Scheduler(config, BlockManager(num_blocks, block_size))
    rng = random.Random(seed)
    all_requests: list[Request] = []
    now = 0.0

    def step() -> None:
        nonlocal now
        batch = scheduler.schedule()
        check(scheduler, batch, config)
        sampled = {i.request.request_id: (EOS if rng.random() < 0.05 else rng.randrange(1, 100)) for i in batch.items if i.sample}
        now += 1.0
        scheduler.update(batch, sampled, now)
        scheduler.block_manager.check_invariants(list(scheduler.waiting) + scheduler.running)

    for op, a, b in ops:
        if op == "add":
            prompt_len = min(a, max_model_len - 1)
            r = Request(str(len(all_requests)), [5] * prompt_len, SamplingParams(max_tokens=b), eos_token_ids=(EOS,))
            scheduler.add(r)
            all_requests.append(r)
        elif op == "step":
            step()
        elif op == "abort" and all_requests:
            scheduler.abort(all_requests[a % len(all_requests)].request_id, now)

    for _ in range(10_000):
        if not scheduler.has_unfinished():
            break
        step()
    assert not scheduler.has_unfinished(), "requests left unfinished: the scheduler stalled"
    assert scheduler.block_manager.num_free_blocks == num_blocks, "blocks leaked"
    for r in all_requests:
        assert r.is_finished and r.block_ids == []
        assert r.finish_reason in ("stop", "length", "abort")
        if r.finish_reason == "length":
            assert r.num_output_tokens == r.params.max_tokens or r.num_tokens == max_model_len
        if r.finish_reason != "abort":
            assert len(r.token_times_s) == r.num_output_tokens >= 1


def test_preemption_recomputes_prompt_and_outputs():
    # Two requests that cannot both hold their blocks: the later one is preempted and recomputed.
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, enable_chunked_prefill=True, max_model_len=16)
    scheduler = Scheduler(config, BlockManager(num_blocks=4, block_size=4))
    a = Request("a", [1] * 7, SamplingParams(max_tokens=8, ignore_eos=True))
    b = Request("b", [2] * 7, SamplingParams(max_tokens=8, ignore_eos=True))
    scheduler.add(a)
    scheduler.add(b)
    preempted = []
    now = 0.0
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        preempted += batch.preempted_ids
        now += 1
        scheduler.update(batch, {i.request.request_id: 9 for i in batch.items if i.sample}, now)
        if preempted and b.num_computed_tokens == 0:
            assert b.output_token_ids, "b keeps its outputs while waiting to be recomputed"
    assert preempted and preempted[0] == "b"
    assert b.num_preemptions >= 1
    assert a.num_output_tokens == b.num_output_tokens == 8
    assert scheduler.block_manager.num_free_blocks == 4


def test_chunked_prefill_splits_a_long_prompt_and_mixes_with_decodes():
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, enable_chunked_prefill=True, max_model_len=64)
    scheduler = Scheduler(config, BlockManager(num_blocks=32, block_size=4))
    a = Request("a", [1] * 3, SamplingParams(max_tokens=10, ignore_eos=True))
    b = Request("b", [2] * 20, SamplingParams(max_tokens=2, ignore_eos=True))
    scheduler.add(a)
    scheduler.add(b)
    kinds, signatures = [], []
    for now in range(1, 6):
        batch = scheduler.schedule()
        kinds.append(batch.kind)
        signatures.append(batch.signature())
        scheduler.update(batch, {i.request.request_id: 9 for i in batch.items if i.sample}, float(now))
    assert signatures[0] == (("a", 0, 3), ("b", 0, 5))
    assert signatures[1] == (("a", 3, 1), ("b", 5, 7))
    assert signatures[2] == (("a", 4, 1), ("b", 12, 7))
    assert signatures[3] == (("a", 5, 1), ("b", 19, 1))
    assert kinds[1] == "mixed"


@settings(max_examples=150, deadline=None)
@given(
    arrivals=st.lists(st.tuples(st.integers(0, 30), st.integers(1, 40), st.integers(1, 20)), min_size=1, max_size=12),
    chunked=st.booleans(),
    num_blocks=st.sampled_from([16, 24, 40, 300]),
    budget=st.integers(1, 64),
    seats=st.sampled_from([2, 64]),
)
def test_scheduling_ahead_gives_the_batches_schedule_gives_after_the_update(arrivals, chunked, num_blocks, budget,
                                                                           seats):
    """Async scheduling: `schedule_after(batch)` before `update(batch)` returns the batch `schedule` returns
    after it (requests arriving between steps, preemptions, chunks), or None where it cannot know it yet.
    The slots and blocks of a request that ends by length in `batch` are free only after the update, so
    where they are short a waiting request may start a step later; with plenty of both (64 slots, 300
    blocks), the two drivers schedule exactly alike. Every request finishes either way."""
    block_size = 4
    max_model_len = 64
    config = SchedulerConfig(max_num_seqs=seats, max_num_batched_tokens=budget if chunked else max(budget, max_model_len),
                             enable_chunked_prefill=chunked, max_model_len=max_model_len)

    def drive(ahead: bool) -> list:
        scheduler = Scheduler(config, BlockManager(num_blocks, block_size))
        by_step: dict[int, list] = {}
        for i, (at, prompt, out) in enumerate(arrivals):
            by_step.setdefault(at, []).append(Request(str(i), [7] * min(prompt, max_model_len - 2),
                                                      SamplingParams(max_tokens=out, ignore_eos=True)))
        batches, running = [], None
        for step in range(400):
            for request in by_step.pop(step, []):
                scheduler.add(request)
            following = scheduler.schedule_after(running) if ahead and running is not None else None
            if running is not None:
                sampled = {item.request.request_id: 100 + step for item in running.items if item.sample}
                scheduler.update(running, sampled, float(step))
            running = following if following is not None else scheduler.schedule()
            check(scheduler, running, config)
            batches.append(running.signature())
            if not scheduler.has_unfinished() and not by_step:
                break
        assert not scheduler.has_unfinished(), "every request finishes"
        return batches

    sync, ahead = drive(False), drive(True)
    if seats == 64 and num_blocks == 300:
        assert ahead == sync
