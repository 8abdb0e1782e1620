"""The scheduler's disaggregation paths, case by case: decode-side reservation and transfer, held blocks on
either side. Random interleavings of the same operations: test_disaggregated_interleavings.py."""

from __future__ import annotations

import pytest

from pdlab.policy.request import RequestStatus
from tests.policy.disaggregation import EOS, make_scheduler, req, snapshot, step


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
