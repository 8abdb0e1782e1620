"""The fidelity table: relative errors of simulated metrics against real ones."""

from __future__ import annotations

from pdlab.metrics.fidelity import fidelity_table
from pdlab.metrics.records import RequestRecord


def records(scale: float) -> list[RequestRecord]:
    out = []
    for i in range(20):
        first = i * 0.1 + 0.05 * scale
        times = tuple(first + k * 0.01 * scale for k in range(5))
        out.append(RequestRecord(f"r{i}", "real", "colocated", i * 0.1, first, times[-1], 10, 5, "length", times))
    return out


def test_a_slower_simulation_shows_as_positive_errors():
    table = fidelity_table({"x": (records(1.0), records(1.1))}).set_index("metric")
    assert abs(table.loc["ttft_p50_ms", "error"] - 0.1) < 1e-9
    assert abs(table.loc["tpot_p90_ms", "error"] - 0.1) < 1e-9
    assert not table.loc["ttft_p50_ms", "within_target"]
    same = fidelity_table({"x": (records(1.0), records(1.0))})
    assert (same["error"].abs() < 1e-12).all() and same["within_target"].all()
