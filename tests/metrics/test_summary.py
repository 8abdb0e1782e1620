import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdlab.metrics.records import RequestRecord
from pdlab.metrics.summary import max_rate_meeting_target, meets_slo, summarize, summary_table


def rec(rid, arrival, first, finish, n_out, times, n_in=10, error=None):
    return RequestRecord(rid, "sim", "colocated", arrival, first, finish, n_in, n_out, "length", times, error)


# Hand-made run. Latencies (ms):  TTFT   TPOT   E2E    ITL
#   a: 5 tokens 0.1 s apart       100    100    500    100 x4
#   b: 3 tokens at 1.3, 1.5, 2.1  300    400    1100   200, 600
#   c: 1 token                    200    -      200    -
#   d: failed                     -      -      -      -
RUN = [
    rec("a", 0.0, 0.1, 0.5, 5, [0.1, 0.2, 0.3, 0.4, 0.5], n_in=10),
    rec("b", 1.0, 1.3, 2.1, 3, [1.3, 1.5, 2.1], n_in=20),
    rec("c", 2.0, 2.2, 2.2, 1, [2.2], n_in=30),
    rec("d", 3.0, None, 3.5, 0, [], n_in=40, error="prefill instance died"),
]


def test_latency_statistics():
    s = summarize(RUN)
    expected = {
        "ttft": (200, 200, 280, 298),  # [100, 300, 200]
        "tpot": (250, 250, 370, 397),  # [100, 400]
        "itl": (200, 100, 400, 580),  # [100, 100, 100, 100, 200, 600], pooled over tokens
        "e2e": (600, 500, 980, 1088),  # [500, 1100, 200]
    }
    for metric, values in expected.items():
        got = [s[f"{metric}_{stat}_ms"] for stat in ("mean", "p50", "p90", "p99")]
        assert got == pytest.approx(values), metric


def test_counts_and_throughput():
    s = summarize(RUN)
    assert (s["num_requests"], s["num_completed"], s["num_errors"]) == (4, 3, 1)
    assert s["duration_s"] == 3.5  # first arrival 0.0 to last finish 3.5
    assert s["total_prompt_tokens"] == 60 and s["total_output_tokens"] == 9  # completed requests only
    assert s["request_throughput_rps"] == pytest.approx(3 / 3.5)
    assert s["output_throughput_tokens_per_s"] == pytest.approx(9 / 3.5)
    assert s["total_throughput_tokens_per_s"] == pytest.approx(69 / 3.5)
    assert summarize(RUN, duration_s=6.0)["request_throughput_rps"] == pytest.approx(0.5)


def test_slo_attainment_and_goodput_need_both_slos():
    # a meets both; b misses TTFT; c has one token, so TPOT counts as 0; d failed.
    s = summarize(RUN, slo_ttft_s=0.25, slo_tpot_s=0.15)
    assert s["num_meeting_slo"] == 2
    assert s["slo_attainment"] == 0.5  # of all 4 requests, failures included
    assert s["goodput_rps"] == pytest.approx(2 / 3.5)
    assert s["slo_ttft_ms"] == 250 and s["slo_tpot_ms"] == 150

    assert summarize(RUN, slo_ttft_s=0.35)["slo_attainment"] == 0.75
    assert summarize(RUN, slo_tpot_s=0.099)["num_meeting_slo"] == 1  # only c (TPOT 0)
    assert summarize(RUN, slo_ttft_s=0.1, slo_tpot_s=0.1)["num_meeting_slo"] == 1  # a sits on both bounds: inclusive


def test_without_slos_there_is_no_goodput():
    s = summarize(RUN)
    assert s["goodput_rps"] is None and s["slo_attainment"] is None and s["num_meeting_slo"] is None


def test_meets_slo():
    assert meets_slo(RUN[0], None, None)
    assert not meets_slo(RUN[3], None, None)


def test_empty_run():
    s = summarize([])
    assert s["num_requests"] == 0 and s["duration_s"] == 0.0
    assert s["request_throughput_rps"] is None and s["ttft_p99_ms"] is None
    assert summarize([], slo_ttft_s=1.0)["slo_attainment"] is None


def test_summary_table_puts_runs_side_by_side():
    table = summary_table({"colocated": summarize(RUN, 0.25, 0.15), "disaggregated": summarize(RUN[:2], 0.25, 0.15)})
    assert list(table.columns) == ["colocated", "disaggregated"]
    assert table.loc["ttft_p90_ms", "colocated"] == pytest.approx(280)
    assert table.loc["num_requests"].tolist() == [4, 2]
    assert table.loc["slo_attainment", "disaggregated"] == 0.5
    assert math.isnan(summary_table({"x": summarize([])}).loc["ttft_mean_ms", "x"])


def test_max_rate_meeting_target():
    assert max_rate_meeting_target({1.0: 0.99, 2.0: 0.95, 3.0: 0.85, 4.0: 0.92}) == 2.0
    assert max_rate_meeting_target({1.0: 0.99, 2.0: 0.95}, target=0.99) == 1.0
    assert max_rate_meeting_target({1.0: 0.5}) is None


latency = st.floats(0, 100, allow_nan=False)


@st.composite
def finished(draw):
    arrival = draw(latency)
    first = arrival + draw(latency)
    gaps = draw(st.lists(latency, max_size=6))
    times = [first]
    for gap in gaps:
        times.append(times[-1] + gap)
    return rec("r", arrival, first, times[-1], len(times), times)


@settings(max_examples=50, deadline=None)
@given(rs=st.lists(finished(), min_size=1, max_size=20), slo_ttft=latency, slo_tpot=latency)
def test_invariants(rs, slo_ttft, slo_tpot):
    s = summarize(rs, slo_ttft, slo_tpot)
    assert 0 <= s["slo_attainment"] <= 1
    if s["duration_s"] > 0:
        assert s["goodput_rps"] <= s["request_throughput_rps"] + 1e-12
    for metric in ("ttft", "tpot", "itl", "e2e"):
        if s[f"{metric}_p50_ms"] is not None:
            assert s[f"{metric}_p50_ms"] <= s[f"{metric}_p90_ms"] + 1e-9 <= s[f"{metric}_p99_ms"] + 2e-9
    # E2E = TTFT + (n - 1) * TPOT for each request.
    for r in rs:
        if r.tpot_s is not None:
            assert r.e2e_s == pytest.approx(r.ttft_s + (r.num_output_tokens - 1) * r.tpot_s, abs=1e-9)


def test_crossings_interpolate_where_two_sweep_curves_cross():
    import pandas as pd

    from pdlab.metrics.summary import crossings

    sweep = pd.DataFrame({"run": ["a"] * 3 + ["b"] * 3, "backend": ["real"] * 6, "rate_rps": [1, 2, 4] * 2,
                          "goodput_rps": [1.0, 2.0, 2.5, 0.9, 1.6, 3.5]})
    assert crossings(sweep, "a", "b") == [pytest.approx(2 + 2 * (-0.4) / (-0.4 - 1.0))]
    assert crossings(sweep, "a", "a") == [1.0, 2.0]  # equal everywhere: every rate is a crossing point
    assert crossings(sweep[sweep["rate_rps"] < 4], "a", "b") == []
