from pathlib import Path

import numpy as np
import pytest

from pdlab.errors import ConfigError
from pdlab.workload.traces import load_trace, replay_arrivals, trace_lengths, trace_stats

from .synthetic_trace import write_trace

# The shared traces sit beside the repository (../shared) in development and CI; never in it. Each test also
# runs on a synthetic trace of the same layout (synthetic_trace.py), so that a clean clone checks the reader.
TRACES = Path(__file__).parents[2] / ".." / "shared" / "data" / "traces"
needs_traces = pytest.mark.skipif(not TRACES.is_dir(), reason=f"no shared traces at {TRACES}")


@pytest.fixture(scope="module")
def conv():
    return load_trace(TRACES / "azure_conv_2023.csv")


@pytest.fixture(scope="module", params=["synthetic", pytest.param("azure_conv_2023", marks=needs_traces)])
def any_trace(request, tmp_path_factory):
    """A conversation-like trace of at least 400 rows: the synthetic one, and the shared one where it is."""
    if request.param == "synthetic":
        return load_trace(write_trace(tmp_path_factory.mktemp("trace") / "synthetic_conv.csv").path)
    return load_trace(TRACES / f"{request.param}.csv")


def test_a_synthetic_trace_reads_back_with_the_statistics_of_its_rows(tmp_path):
    written = write_trace(tmp_path / "conv.csv", num_requests=400, seed=1)
    trace = load_trace(written.path)
    assert list(trace.columns) == ["arrival_s", "num_prompt_tokens", "num_output_tokens"]
    np.testing.assert_array_equal(trace["arrival_s"], written.arrival_s)
    np.testing.assert_array_equal(trace["num_prompt_tokens"], written.num_prompt_tokens)
    np.testing.assert_array_equal(trace["num_output_tokens"], written.num_output_tokens)
    stats = trace_stats(trace)
    gaps = np.diff(written.arrival_s)
    assert stats["num_requests"] == 400 and stats["span_s"] == pytest.approx(written.arrival_s[-1])
    assert stats["rate_rps"] == pytest.approx(399 / written.arrival_s[-1])
    assert stats["interarrival_cv"] == pytest.approx(gaps.std() / gaps.mean()) and 0.8 < stats["interarrival_cv"] < 1.2
    for column, prefix in ((written.num_prompt_tokens, "prompt"), (written.num_output_tokens, "output")):
        assert stats[f"{prefix}_mean_tokens"] == pytest.approx(column.mean())
        assert stats[f"{prefix}_p50_tokens"] == np.percentile(column, 50)
        assert stats[f"{prefix}_p99_tokens"] == np.percentile(column, 99)
        assert stats[f"{prefix}_max_tokens"] == column.max()


def test_a_synthetic_bursty_trace_is_bursty(tmp_path):
    stats = trace_stats(load_trace(write_trace(tmp_path / "code.csv", bursty=True).path))
    assert stats["num_requests"] == 400
    assert stats["interarrival_cv"] > 10


@needs_traces
def test_conversation_trace_matches_its_published_statistics(conv):
    assert list(conv.columns) == ["arrival_s", "num_prompt_tokens", "num_output_tokens"]
    stats = trace_stats(conv)
    assert stats["num_requests"] == 19_366
    assert conv["arrival_s"].iloc[0] == 0.0 and conv["arrival_s"].is_monotonic_increasing
    assert stats["span_s"] == pytest.approx(58 * 60, rel=0.02)
    assert stats["prompt_p50_tokens"] == 1020 and stats["prompt_max_tokens"] == 14050
    assert stats["output_p50_tokens"] == 129 and stats["output_max_tokens"] == 1000
    assert stats["interarrival_cv"] == pytest.approx(1.0, abs=0.15)


@needs_traces
def test_code_trace_is_bursty():
    stats = trace_stats(load_trace(TRACES / "azure_code_2023.csv"))
    assert stats["num_requests"] == 8_819
    assert stats["interarrival_cv"] > 10


def test_replay_scales_a_window_of_the_trace_to_a_rate(any_trace):
    times = replay_arrivals(any_trace, 300, rate_rps=20.0)
    assert times[0] == 0.0 and 299 / times[-1] == pytest.approx(20.0)
    # The shape of the gaps is the trace's own.
    original = any_trace["arrival_s"].to_numpy()[:300]
    np.testing.assert_allclose(times / times[-1], original / original[-1])
    np.testing.assert_array_equal(replay_arrivals(any_trace, 10), original[:10])


def test_trace_lengths_replay_rows_in_order(any_trace):
    prompts = trace_lengths(any_trace, "num_prompt_tokens", replay=True, max_tokens=2048).sample(50)
    np.testing.assert_array_equal(prompts, any_trace["num_prompt_tokens"].clip(upper=2048).to_numpy()[:50])
    assert prompts.max() == 2048, "the trace should have prompts past the cap"
    drawn = trace_lengths(any_trace, "num_output_tokens").sample(5000, np.random.default_rng(0))
    assert set(drawn.tolist()) <= set(any_trace["num_output_tokens"].clip(lower=1).tolist())


def test_raw_azure_layout_is_read(tmp_path):
    path = tmp_path / "AzureLLMInferenceTrace_conv.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:47.0000000,100,5\n"
        "2023-11-16 18:15:46.5000000,374,44\n"
        "2023-11-16 18:15:49.2500000,20,7\n"
    )
    trace = load_trace(path)
    np.testing.assert_allclose(trace["arrival_s"], [0.0, 0.5, 2.75])
    assert trace["num_prompt_tokens"].tolist() == [374, 100, 20]
    assert trace["num_output_tokens"].tolist() == [44, 5, 7]


def test_processed_layout_is_read_and_shifted_to_zero(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n5.0,10,2\n6.5,20,3\n")
    trace = load_trace(path)
    assert trace["arrival_s"].tolist() == [0.0, 1.5]
    assert trace_stats(trace)["rate_rps"] == pytest.approx(1 / 1.5)


def test_bad_trace_files_give_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="trace file not found"):
        load_trace(tmp_path / "missing.csv")
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("time,prompt,output\n0,1,2\n")
    with pytest.raises(ConfigError, match="unknown trace layout.*TIMESTAMP"):
        load_trace(unknown)
    bad = tmp_path / "bad.csv"
    bad.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0.0,ten,2\n")
    with pytest.raises(ConfigError, match="bad value"):
        load_trace(bad)
    empty = tmp_path / "empty.csv"
    empty.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n")
    with pytest.raises(ConfigError, match="no rows"):
        load_trace(empty)
