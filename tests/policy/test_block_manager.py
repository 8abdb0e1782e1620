import pytest

from pdlab.policy.block_manager import BlockManager
from pdlab.policy.request import Request
from pdlab.sampling_params import SamplingParams


def req(rid: str) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams())


def test_allocate_grows_by_whole_blocks_and_free_returns_them():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = req("a")
    assert bm.allocate(a, 5) == [0, 1]
    assert bm.allocate(a, 8) == []  # still two blocks
    assert bm.allocate(a, 9) == [2]
    assert bm.num_free_blocks == 1
    bm.check_invariants([a])
    bm.free(a)
    assert a.block_ids == [] and bm.num_free_blocks == 4
    bm.check_invariants([])


def test_allocation_past_the_pool_raises_and_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    a = req("a")
    assert not bm.can_allocate(a, 9)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(a, 9)
    assert a.block_ids == [] and bm.num_free_blocks == 2


def test_freeing_blocks_owned_by_another_request_is_caught():
    bm = BlockManager(num_blocks=2, block_size=4)
    a, b = req("a"), req("b")
    bm.allocate(a, 4)
    b.block_ids = list(a.block_ids)
    with pytest.raises(RuntimeError, match="does not own"):
        bm.free(b)
