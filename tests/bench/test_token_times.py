"""Token times from chunk times: one per token, chunks of several tokens spread over their gap."""

from __future__ import annotations

import pytest

from pdlab.bench.runner import token_times


def test_one_token_per_chunk_keeps_the_chunk_times():
    assert token_times([1.0, 1.5, 2.5], 3) == [1.0, 1.5, 2.5]


def test_known_counts_spread_each_chunk_over_its_gap():
    # The first chunk carries 2 tokens (both at the first token's time), the next 2, then 1.
    assert token_times([1.0, 2.0, 4.0], 5, [2, 4, 5]) == pytest.approx([1.0, 1.0, 1.5, 2.0, 4.0])


def test_unknown_counts_give_the_first_chunk_one_token_and_share_the_rest():
    times = token_times([1.0, 2.0, 3.0], 5)
    assert times == pytest.approx([1.0, 1.5, 2.0, 2.5, 3.0])


def test_first_and_last_times_and_the_decode_span_are_kept():
    chunks = [0.3, 0.31, 0.5, 0.52, 0.9]
    for num_tokens in (2, 5, 9, 40):
        times = token_times(chunks, num_tokens)
        assert len(times) == num_tokens and times[0] == 0.3 and times[-1] == pytest.approx(0.9)
        assert times == sorted(times)


def test_edge_cases():
    assert token_times([], 3) == []
    assert token_times([1.0, 2.0], 0) == []
    assert token_times([1.0, 2.0], 1) == [1.0]
    assert token_times([1.0], 3) == [1.0, 1.0, 1.0]
    # Counts that stop short of the usage total (a last token with empty text) end at the last chunk.
    assert token_times([1.0, 2.0], 3, [1, 2]) == pytest.approx([1.0, 2.0, 2.0])
