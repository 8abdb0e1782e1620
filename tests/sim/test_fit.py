"""Fitting the roofline's efficiencies to measured step times: it recovers the ones that made synthetic data."""

import random
from dataclasses import replace

import pytest

from pdlab.models.presets import PRESETS
from pdlab.sim import H100, ProfileCost, RooflineCost
from pdlab.sim.fit import fit_roofline, read_profile, row_batch
from pdlab.sim.profile_cost import PROFILE_COLUMNS

MODEL = PRESETS["llama3-8b"]
TRUE = RooflineCost(MODEL, compute_efficiency=0.48, bandwidth_efficiency=0.83, step_overhead_s=2.5e-3)


def profile_rows(cost=TRUE, noise=0.0, seed=0):
    """The rows `python -m pdlab.profiler` writes, with the times `cost` predicts (times 1 +- noise)."""
    rng = random.Random(seed)
    rows = [{"phase": "prefill", "num_seqs": 1, "num_tokens": n, "context_tokens": n}
            for n in (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)]
    rows += [{"phase": "decode", "num_seqs": b, "num_tokens": b, "context_tokens": c}
             for c in (128, 512, 2048) for b in (1, 4, 16, 64, 256)]
    for row in rows:
        row["step_ms"] = cost.step_time_s(row_batch(row)) * 1e3 * (1 + noise * rng.uniform(-1, 1))
    return rows


def test_recovers_the_efficiencies_that_made_the_data():
    fit = fit_roofline(profile_rows(), RooflineCost(MODEL))  # starts from the defaults, 0.65 / 0.72 / 1 ms
    assert fit.cost.compute_efficiency == pytest.approx(0.48, rel=1e-6)
    assert fit.cost.bandwidth_efficiency == pytest.approx(0.83, rel=1e-6)
    assert fit.cost.step_overhead_s == pytest.approx(2.5e-3, rel=1e-6)
    assert fit.max_relative_error < 1e-6
    assert fit.num_compute_bound >= 5 and fit.num_memory_bound >= 15  # long prefills vs decodes and short prompts


def test_recovers_them_from_noisy_data_too():
    fit = fit_roofline(profile_rows(noise=0.03, seed=1), RooflineCost(MODEL))
    assert fit.cost.compute_efficiency == pytest.approx(0.48, rel=0.04)
    assert fit.cost.bandwidth_efficiency == pytest.approx(0.83, rel=0.05)
    assert fit.cost.step_overhead_s == pytest.approx(2.5e-3, abs=0.5e-3)
    assert fit.max_relative_error < 0.08


def test_a_side_no_row_constrains_keeps_its_prior():
    decodes = [r for r in profile_rows() if r["phase"] == "decode" and r["num_seqs"] <= 64]  # all memory-bound
    fit = fit_roofline(decodes, RooflineCost(MODEL, compute_efficiency=0.6))
    assert fit.num_compute_bound == 0
    assert fit.cost.compute_efficiency == 0.6
    assert fit.cost.bandwidth_efficiency == pytest.approx(0.83, rel=1e-6)


def test_reads_a_profile_csv(tmp_path):
    import csv

    path = tmp_path / "profile.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PROFILE_COLUMNS)
        writer.writeheader()
        writer.writerows(profile_rows())
    rows = read_profile(path)
    assert fit_roofline(rows, RooflineCost(MODEL)).cost.bandwidth_efficiency == pytest.approx(0.83, rel=1e-6)
    ProfileCost.from_rows(rows)  # the same table the interpolating cost model reads


def test_unusable_data_is_refused_with_a_reason():
    rows = profile_rows()
    with pytest.raises(ValueError, match="at least 3"):
        fit_roofline(rows[:2], RooflineCost(MODEL))
    with pytest.raises(ValueError, match="cannot separate"):
        fit_roofline([rows[0]] * 5, RooflineCost(MODEL))
    slow_gpu = replace(H100, peak_flops=H100.peak_flops / 4)  # the data beat its peak
    with pytest.raises(ValueError, match="compute_efficiency .* outside"):
        fit_roofline(rows, RooflineCost(MODEL, gpu=slow_gpu))
