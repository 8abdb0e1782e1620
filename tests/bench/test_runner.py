"""`run_benchmark` against the fake OpenAI-compatible server of conftest.py (loopback, known delays)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from pdlab.bench import BenchConfig, run_benchmark
from pdlab.bench.report import format_report, write_outputs
from pdlab.bench.runner import workload_spec
from pdlab.errors import PdlabError
from pdlab.metrics.records import read_records_csv
from pdlab.workload import PoissonArrivals, WorkloadSpec, make_workload
from tests.margins import STALL_S

# Lower bounds are the fake's delays and the schedule, which nothing can beat; upper bounds add STALL_S, since
# the machine running the tests may be slow and busy (they catch a wrong origin or unit, not a slow client).


def bench(server, **settings) -> tuple[list, dict]:
    settings = {"num_prompts": 6, "input_len": 16, "output_len": 5, "progress": False, "tokenizer": "none",
                **settings}
    return run_benchmark(BenchConfig(base_url=server.base_url, **settings))


def test_records_follow_the_servers_delays_and_counts(fake_server):
    server = fake_server(ttft_s=0.05, itl_s=0.02)
    records, summary = bench(server, num_prompts=8, input_len="uniform:4:32", output_len=6)
    assert len(records) == 8 and all(r.ok for r in records), [r.error for r in records]
    assert [r.request_id for r in records] == [f"req-{i}" for i in range(8)]
    bodies = [x.body for x in server.received]
    assert all(b["model"] == server.model and b["max_tokens"] == 6 and b["ignore_eos"] is True and b["stream"]
               for b in bodies)
    assert all(b["stream_options"] == {"include_usage": True} for b in bodies)
    for r in records:
        assert r.backend == "real" and r.mode == "bench" and r.finish_reason == "length"
        assert r.num_output_tokens == 6 and len(r.token_times_s) == 6
        assert 4 <= r.num_prompt_tokens <= 32  # the fake counts words
        # Token k leaves the fake ttft + k * itl after the request reached it: it cannot arrive sooner.
        # (A busy client may read a chunk late, which shortens the gap after it: lower bounds go by arrival.)
        for k, t in enumerate(r.token_times_s):
            assert t - r.arrival_s >= 0.05 + k * 0.02
        assert r.ttft_s < 0.05 + STALL_S and all(gap < 0.02 + STALL_S for gap in r.itl_s)
        assert 0.05 + 5 * 0.02 <= r.e2e_s < 0.05 + 5 * 0.02 + STALL_S
        assert r.first_token_s == r.token_times_s[0] and r.token_times_s[-1] <= r.finish_s
    assert summary["num_completed"] == 8 and summary["num_errors"] == 0
    assert summary["total_output_tokens"] == 48 and summary["model"] == server.model
    assert summary["ttft_p50_ms"] >= 50 and summary["itl_p50_ms"] >= 0.8 * 20
    assert summary["request_throughput_rps"] == pytest.approx(8 / summary["duration_s"])
    assert summary["slo_attainment"] is None and summary["goodput_rps"] is None


def test_chat_endpoint_times_the_first_content_not_the_role_chunk(fake_server):
    server = fake_server(ttft_s=0.1, itl_s=0.01)
    records, _ = bench(server, endpoint="/v1/chat/completions", input_len=10, output_len=3)
    assert all(r.ok for r in records) and server.received[0].path == "/v1/chat/completions"
    assert all(r.ttft_s >= 0.1 for r in records)  # the role chunk comes at once
    assert all(r.num_prompt_tokens == 10 + server.chat_template_tokens for r in records)  # the server's count
    assert server.received[0].body["messages"][0]["role"] == "user"


def test_rate_limited_arrivals_are_spaced(fake_server):
    server = fake_server(ttft_s=0.01, itl_s=0.01)
    start_s = time.perf_counter()  # the fake's clock is this process's
    records, summary = bench(server, num_prompts=6, request_rate_rps=20.0, arrival="constant", output_len=2)
    received = sorted(x.time_s - start_s for x in server.received)
    for i, t in enumerate(received):  # no request starts earlier than scheduled
        assert t >= i / 20
    lags_s = [r.arrival_s - i / 20 for i, r in enumerate(records)]
    assert all(-1e-3 <= lag < STALL_S for lag in lags_s)
    assert summary["send_lag_max_ms"] == pytest.approx(max(lags_s) * 1e3)  # the lag the summary reports is the real one


def test_poisson_arrivals_follow_the_seeded_schedule(fake_server):
    server = fake_server(ttft_s=0.005, itl_s=0.005)
    records, _ = bench(server, num_prompts=8, request_rate_rps=25.0, output_len=2, seed=7)
    spec = WorkloadSpec(8, PoissonArrivals(25.0), prompt_len=bench_len(16), output_len=bench_len(2))
    scheduled = [r.arrival_s for r in make_workload(spec, vocab_size=10, seed=7, min_token_id=0)]
    sent = [r.arrival_s for r in records]
    assert np.all(np.asarray(sent) >= np.asarray(scheduled) - 1e-3)
    assert np.all(np.asarray(sent) < np.asarray(scheduled) + STALL_S)


def bench_len(n: int):
    from pdlab.workload import FixedLength

    return FixedLength(n)


def test_max_concurrency_is_respected(fake_server):
    server = fake_server(ttft_s=0.03, itl_s=0.01)
    records, summary = bench(server, num_prompts=10, max_concurrency=3, output_len=3)
    assert all(r.ok for r in records)
    assert server.max_in_flight == 3 and summary["max_in_flight"] == 3
    # A closed loop: ten requests in rounds of three take at least four rounds.
    assert summary["duration_s"] >= 4 * (0.03 + 2 * 0.01)


def test_http_errors_become_records_and_the_run_ends(fake_server):
    server = fake_server(fail_every=3)
    records, summary = bench(server, num_prompts=9, slo_ttft_ms=5000, slo_tpot_ms=1000)
    failed = [r for r in records if r.error is not None]
    assert len(failed) == 3 and summary["num_errors"] == 3 and summary["num_completed"] == 6
    for r in failed:
        assert r.error.startswith("HTTP 400: fake rejects request") and not r.ok
        assert r.finish_reason == "error" and r.first_token_s is None and r.finish_s is None
    # Failed requests count against attainment, not against goodput's numerator.
    assert summary["slo_attainment"] == pytest.approx(6 / 9) and summary["num_meeting_slo"] == 6
    report = format_report(BenchConfig(base_url=server.base_url), records, summary)
    assert "3 requests failed" in report and "[1x] HTTP 400: fake rejects request 3" in report


def test_a_hung_request_times_out_and_the_run_ends(fake_server):
    server = fake_server(hang_every=2)
    start = time.perf_counter()
    records, summary = bench(server, num_prompts=4, timeout_s=0.6)
    assert time.perf_counter() - start < 0.6 + STALL_S  # the hung ones would never end by themselves
    hung = [r for r in records if r.error is not None]
    assert len(hung) == 2 and all(r.error == "timeout: no [DONE] within 0.6 s" for r in hung)
    assert summary["num_completed"] == 2


def test_an_unreachable_server_fails_every_request_without_raising(fake_server):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    records, summary = run_benchmark(BenchConfig(base_url=f"http://127.0.0.1:{port}", model="m", num_prompts=3,
                                                 input_len=4, output_len=2, tokenizer="none", progress=False))
    assert len(records) == 3 and all("ConnectError" in r.error for r in records)
    assert summary["num_completed"] == 0 and summary["request_throughput_rps"] is None


def test_model_discovery_and_a_wrong_model(fake_server):
    server = fake_server()
    records, _ = bench(server, model="other-model", num_prompts=2)
    assert all(r.error == "HTTP 404: model 'other-model' not found" for r in records)
    with pytest.raises(PdlabError, match="is the server up"):
        run_benchmark(BenchConfig(base_url="http://127.0.0.1:1", num_prompts=1, progress=False))


def test_multi_token_chunks_are_spread_and_counted_from_usage(fake_server):
    server = fake_server(ttft_s=0.02, itl_s=0.04, tokens_per_chunk=2)
    records, _ = bench(server, num_prompts=2, output_len=6, continuous_usage=True)
    assert server.received[0].body["stream_options"]["continuous_usage_stats"] is True
    for r in records:
        assert r.ok and r.num_output_tokens == 6 and len(r.token_times_s) == 6
        t = r.token_times_s
        # Chunks of 2: the first two tokens arrive together, the others split their chunk's gap.
        assert t[0] == t[1] and t[2] == pytest.approx((t[1] + t[3]) / 2) and t[4] == pytest.approx((t[3] + t[5]) / 2)
        assert t[5] - r.arrival_s >= 0.02 + 2 * 0.04 and len(set(t)) == 5


def test_without_usage_tokens_are_counted_by_chunk(fake_server):
    server = fake_server(send_usage=False)
    records, _ = bench(server, num_prompts=2, input_len=7, output_len=4)
    assert all(r.ok and r.num_output_tokens == 4 for r in records)
    assert all(r.num_prompt_tokens == 7 for r in records)  # the client's own count


def test_token_id_prompts_are_sent_as_lists(fake_server):
    server = fake_server()
    records, summary = bench(server, num_prompts=3, input_len=9, tokenizer="tiny", prompt_token_ids=True)
    assert all(r.ok and r.num_prompt_tokens == 9 for r in records)
    assert all(isinstance(x.body["prompt"], list) and len(x.body["prompt"]) == 9 for x in server.received)
    assert summary["prompts"] == "token ids, tokenizer tiny"
    with pytest.raises(PdlabError, match="pass --tokenizer"):
        bench(server, prompt_token_ids=True, tokenizer=None)  # "fake-model" is no model pdlab knows


def test_trace_lengths_and_arrivals(fake_server, tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n"
                     "10.0,5,3\n10.1,50,2\n10.3,7,4\n10.4,8,1\n")
    server = fake_server(ttft_s=0.005, itl_s=0.005)
    records, _ = bench(server, num_prompts=4, input_len=None, output_len=None, trace=trace, trace_arrivals=True,
                       trace_max_input_len=20)
    assert [r.num_prompt_tokens for r in records] == [5, 20, 7, 8]
    assert [r.num_output_tokens for r in records] == [3, 2, 4, 1]
    for r, expected in zip(records, (0.0, 0.1, 0.3, 0.4), strict=True):
        assert expected - 1e-3 <= r.arrival_s < expected + STALL_S
    # With a rate, the trace's gaps keep their shape and are scaled to it: 3 gaps over 0.4 s -> 3 gaps over 0.15 s.
    config = BenchConfig(base_url=server.base_url, num_prompts=4, input_len=None, output_len=None, trace=trace,
                         trace_arrivals=True, request_rate_rps=20.0, progress=False, tokenizer="none")
    schedule = workload_spec(config).arrivals.sample(4)
    np.testing.assert_allclose(schedule, [0.0, 0.0375, 0.1125, 0.15])
    records, _ = run_benchmark(config)
    for r, expected in zip(records, schedule, strict=True):
        assert expected - 1e-3 <= r.arrival_s < expected + STALL_S
    with pytest.raises(PdlabError, match="fewer than the 5 prompts"):
        bench(server, num_prompts=5, trace=trace)


def test_outputs_round_trip_through_the_records_csv(fake_server, tmp_path):
    server = fake_server(fail_every=4)
    config = BenchConfig(base_url=server.base_url, num_prompts=8, input_len=6, output_len=3, tokenizer="none",
                         progress=False, label="fake", slo_ttft_ms=1000, slo_tpot_ms=500)
    records, summary = run_benchmark(config)
    paths = write_outputs(config, records, summary, tmp_path / "out")
    assert [p.name for p in paths] == ["records.csv", "summary.json"]
    assert read_records_csv(tmp_path / "out" / "records.csv") == records
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(summary))
    assert saved["config"]["label"] == "fake" and saved["config"]["request_rate_rps"] == "inf"
    assert saved["errors"] == [{"message": "HTTP 400: fake rejects request 4", "count": 1},
                               {"message": "HTTP 400: fake rejects request 8", "count": 1}]
    assert {r.mode for r in records} == {"fake"}


def test_same_seed_sends_the_same_prompts(fake_server):
    server = fake_server(ttft_s=0.001, itl_s=0.001)
    bench(server, num_prompts=4, input_len="uniform:1:20", seed=5)
    bench(server, num_prompts=4, input_len="uniform:1:20", seed=5)
    first, second = server.received[:4], server.received[4:]
    assert sorted(x.body["prompt"] for x in first) == sorted(x.body["prompt"] for x in second)
