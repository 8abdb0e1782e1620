"""The served overhead measured from token intervals: gaps near arrivals left out, the engine's step subtracted,
a median per batch size; and on the committed one-GPU runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlab.fidelity import main as fidelity_main
from pdlab.metrics.records import RequestRecord
from pdlab.metrics.served import QUIET_BEFORE_S, decode_gaps, served_overhead_ms

ROOT = Path(__file__).resolve().parents[2]


def engine_s(batch: float, context: float) -> float:
    return 0.006 + 0.0001 * batch + 1e-7 * context


def served_run(batch: int, overhead_s: float, steps: int = 120, start_s: float = 0.0) -> list[RequestRecord]:
    """`batch` requests arriving together, prefilled in one 50 ms step, then decoding in lockstep, each step the
    engine's plus `overhead_s`."""
    step = engine_s(batch, 100 + steps / 2) + overhead_s  # the context drifts by a few tokens: ~constant
    times = [start_s + 0.05 + i * step for i in range(steps)]
    return [RequestRecord(f"r{start_s}-{i}", "real", "colocated", start_s, times[0], times[-1], 100, steps, "length",
                          tuple(times)) for i in range(batch)]


def test_the_overhead_of_each_batch_size_is_what_the_steps_took_beyond_the_engine():
    records = served_run(1, 0.0) + served_run(4, 0.001, start_s=10.0) + served_run(16, 0.003, start_s=20.0)
    table = served_overhead_ms(records, engine_s)
    assert table == pytest.approx({1: 0.0, 4: 1.0, 16: 3.0}, abs=0.05)


def test_gaps_soon_after_an_arrival_are_left_out():
    records = served_run(2, 0.001, steps=250)  # decoding from 0.05 s to 1.85 s
    late = RequestRecord("late", "real", "colocated", 1.0, 1.2, 1.3, 3000, 2, "length", (1.2, 1.3))
    # A gap (a, b] goes when the arrival at 1.0 s is in [a - QUIET_BEFORE_S, b]; so does the late one's own.
    near = sum(a - QUIET_BEFORE_S <= 1.0 <= b for r in records for a, b in zip(r.token_times_s, r.token_times_s[1:]))
    assert near > 2 * QUIET_BEFORE_S / 0.0073
    assert len(decode_gaps([*records, late])) == len(decode_gaps(records)) - near
    assert served_overhead_ms([*records, late], engine_s) == pytest.approx({2: 1.0}, abs=0.05)


def test_a_run_without_enough_quiet_gaps_measures_nothing():
    assert served_overhead_ms(served_run(3, 0.001, steps=10), engine_s) == {}


@pytest.mark.skipif(not (ROOT / "data/results/one_gpu_conversation/records.csv.gz").exists(),
                    reason="the committed one-GPU results are absent")
def test_the_committed_conversation_run_measures_little_at_small_batches_and_3_ms_from_16(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert fidelity_main(["data/results/one_gpu_conversation", "--profile", "data/profiles/llama3-8b_bf16_tp1_h100.csv",
                          "--measure-overhead", "colocated@8"]) == 0
    table = dict(pair.split(":") for pair in capsys.readouterr().out.split("--step-overhead-ms ")[1].split(","))
    table = {int(n): float(ms) for n, ms in table.items()}
    assert max(ms for n, ms in table.items() if n <= 8) < 1.0
    assert all(2.5 < ms < 5 for n, ms in table.items() if n >= 18)
