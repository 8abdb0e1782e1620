"""The KV cache's share of a GPU, counted from the instance's own memory (pdlab/engine/memory.py)."""

from __future__ import annotations

import pytest

from pdlab.engine.memory import ACTIVATION_RESERVE_BYTES, CUDA_CONTEXT_BYTES, GiB, MemoryPlan

TOTAL = 80 * GiB
WEIGHTS = 16 * GiB


def kv_gib(plan: MemoryPlan) -> float:
    return plan.kv_cache_bytes / GiB


def test_two_instances_sharing_a_card_each_get_their_share_in_either_order():
    """The second instance to start sees the first one's memory as used, yet gets the same KV cache as
    when it starts first: only its own allocations count against its share."""
    fixed = (CUDA_CONTEXT_BYTES + ACTIVATION_RESERVE_BYTES) / GiB
    for first, second in ((0.35, 0.55), (0.55, 0.35)):
        alone = MemoryPlan(TOTAL, free_bytes=TOTAL - WEIGHTS, share=first, own_bytes=WEIGHTS)
        # The first instance holds its share (weights, context, KV cache and reserve); the second has loaded its weights.
        used_by_first = int(first * TOTAL)
        after = MemoryPlan(TOTAL, free_bytes=TOTAL - used_by_first - WEIGHTS, share=second, own_bytes=WEIGHTS)
        assert kv_gib(alone) == pytest.approx(first * 80 - 16 - fixed)
        assert kv_gib(after) == pytest.approx(second * 80 - 16 - fixed)
        assert not after.limited_by_free


def test_the_old_rule_would_have_given_the_second_instance_nothing():
    """What `total * share - (total - free)` gave the second of two instances of 0.45 each: nothing left."""
    free = TOTAL - int(0.45 * TOTAL) - WEIGHTS
    old_rule = int(0.45 * TOTAL) - (TOTAL - free) - ACTIVATION_RESERVE_BYTES
    assert old_rule < 0
    assert kv_gib(MemoryPlan(TOTAL, free, share=0.45, own_bytes=WEIGHTS)) > 15


def test_mapped_weights_leave_the_whole_share_to_the_kv_cache():
    plan = MemoryPlan(TOTAL, free_bytes=TOTAL - 30 * GiB, share=0.55, own_bytes=0, mapped_bytes=WEIGHTS)
    assert kv_gib(plan) == pytest.approx(0.55 * 80 - (CUDA_CONTEXT_BYTES + ACTIVATION_RESERVE_BYTES) / GiB)
    assert "mapped from another instance" in plan.describe()


def test_shares_adding_up_to_more_than_the_card_are_capped_by_what_is_free():
    plan = MemoryPlan(TOTAL, free_bytes=10 * GiB, share=0.9, own_bytes=WEIGHTS)
    assert plan.limited_by_free and kv_gib(plan) == pytest.approx(10 - ACTIVATION_RESERVE_BYTES / GiB)
    assert "only 10.0 GiB of the card is free" in plan.too_small(20 * GiB, "one sequence")


def test_a_share_too_small_names_the_numbers_and_the_share_that_would_do():
    plan = MemoryPlan(TOTAL, free_bytes=TOTAL - WEIGHTS, share=0.2, own_bytes=WEIGHTS)
    assert plan.kv_cache_bytes == 0
    message = plan.too_small(1 * GiB, "one sequence of max_model_len=8192 tokens")
    for part in ("--gpu-memory-utilization 0.2", "16.0 GiB of the card's 80.0 GiB", "weights take 16.0 GiB",
                 "1.00 GiB", "raise it to at least"):
        assert part in message, part
    need = plan.min_share(1 * GiB)
    assert MemoryPlan(TOTAL, TOTAL - WEIGHTS, share=need, own_bytes=WEIGHTS).kv_cache_bytes == pytest.approx(GiB, abs=2)
