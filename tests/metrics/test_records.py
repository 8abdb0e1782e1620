import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdlab.metrics.records import RequestRecord, frame_to_records, read_records_csv, records_to_frame, write_records_csv


def record(**changes) -> RequestRecord:
    fields = dict(
        request_id="req-0",
        backend="real",
        mode="colocated",
        arrival_s=1.0,
        first_token_s=1.5,
        finish_s=3.5,
        num_prompt_tokens=10,
        num_output_tokens=5,
        finish_reason="length",
        token_times_s=[1.5, 2.0, 2.5, 3.0, 3.5],
    )
    return RequestRecord(**{**fields, **changes})


def test_latencies_of_one_request():
    r = record()
    assert r.ttft_s == 0.5
    assert r.tpot_s == 0.5  # (3.5 - 1.5) / (5 - 1)
    assert r.e2e_s == 2.5
    assert r.itl_s == [0.5, 0.5, 0.5, 0.5]
    assert r.token_times_s == (1.5, 2.0, 2.5, 3.0, 3.5)
    assert r.ok


def test_one_token_has_no_tpot_and_a_failed_request_has_no_latencies():
    one = record(num_output_tokens=1, finish_s=1.5, token_times_s=[1.5])
    assert one.tpot_s is None and one.itl_s == [] and one.e2e_s == 0.5
    failed = record(
        first_token_s=None, finish_s=None, num_output_tokens=0, token_times_s=[], finish_reason="error", error="boom"
    )
    assert failed.ttft_s is None and failed.tpot_s is None and failed.e2e_s is None and not failed.ok


def test_frame_has_schema_and_derived_columns():
    frame = records_to_frame([record(), record(request_id="req-1", error="x", first_token_s=None)])
    assert list(frame.columns[:3]) == ["request_id", "backend", "mode"]
    assert frame.loc[0, "ttft_s"] == 0.5 and frame.loc[0, "tpot_s"] == 0.5 and frame.loc[0, "e2e_s"] == 2.5
    assert frame["ttft_s"].isna().tolist() == [False, True]
    assert frame.loc[0, "token_times_s"] == [1.5, 2.0, 2.5, 3.0, 3.5]
    assert frame_to_records(frame)[0] == record()


def test_csv_stores_token_times_as_json(tmp_path):
    path = write_records_csv([record()], tmp_path / "deep" / "records.csv")
    text = path.read_text()
    assert "token_times_s" in text.splitlines()[0]
    assert json.dumps([1.5, 2.0, 2.5, 3.0, 3.5]) in text.replace('""', '"')
    assert read_records_csv(path) == [record()]


def test_empty_csv_round_trip(tmp_path):
    path = write_records_csv([], tmp_path / "empty.csv")
    assert read_records_csv(path) == []


times = st.floats(0, 1e6, allow_nan=False)
text = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\r"), min_size=1, max_size=20)
records = st.builds(
    RequestRecord,
    request_id=st.one_of(text, st.sampled_from(["NA", "nan", "None", "0001", "null"])),
    backend=st.sampled_from(["real", "sim"]),
    mode=st.sampled_from(["colocated", "disaggregated"]),
    arrival_s=times,
    first_token_s=st.one_of(st.none(), times),
    finish_s=st.one_of(st.none(), times),
    num_prompt_tokens=st.integers(0, 10**6),
    num_output_tokens=st.integers(0, 10**4),
    finish_reason=st.one_of(st.none(), st.sampled_from(["stop", "length", "abort", "error"])),
    token_times_s=st.lists(times, max_size=8),
    error=st.one_of(st.none(), text),
)


@settings(max_examples=60, deadline=None)
@given(rs=st.lists(records, max_size=6))
def test_csv_round_trip_is_exact(rs):
    with tempfile.TemporaryDirectory() as d:
        path = write_records_csv(rs, Path(d) / "r.csv")
        assert read_records_csv(path) == rs


@pytest.mark.parametrize("bad", [" NA", "a,b", 'quote "x"', "line\nbreak"])
def test_awkward_strings_survive_csv(tmp_path, bad):
    rs = [record(request_id=bad, error=bad)]
    assert read_records_csv(write_records_csv(rs, tmp_path / "r.csv")) == rs
