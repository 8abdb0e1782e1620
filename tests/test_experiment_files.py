"""Every experiment file validates; those that run in the simulator run end to end (fewer requests)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from pdlab.experiment import load_experiment
from pdlab.run import run_experiment

FILES = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_every_experiment_file_validates(path):
    exp = load_experiment(path)
    assert exp.name == path.stem, "results go to results/<name>/: name each file after itself"
    assert exp.slo.ttft_ms and exp.slo.tpot_ms, "every comparison states its SLOs"


SIM_ONLY = [p for p in FILES if all(r.backend == "sim" for r in load_experiment(p).runs)]


@pytest.mark.parametrize("path", SIM_ONLY, ids=[p.name for p in SIM_ONLY])
def test_simulated_experiments_run_end_to_end(path, tmp_path):
    exp = load_experiment(path, ["workload.num_requests=60"]).model_copy(update={"output_dir": tmp_path})
    result = run_experiment(exp, progress=False)
    sweep = pd.read_csv(result.out_dir / "sweep.csv")
    assert len(sweep) == len(exp.runs) * len(exp.rates)
    assert (sweep["num_completed"] == 60).all()
    for name in ("sweep.png", "sweep.svg", "cdf.png", "records.csv", "provenance.json"):
        assert (result.out_dir / name).stat().st_size > 0


def test_the_pair_experiments_have_the_three_layouts_and_a_simulated_twin():
    for name in ("h100_pair_conversation", "h100_pair_code", "h100_pair_long_prompt"):
        exp = load_experiment(FILES[0].parent / f"{name}.yaml")
        layouts = {(r.mode, r.num_instances, r.tensor_parallel_size) for r in exp.runs}
        assert layouts == {("colocated", 2, None), ("colocated", 1, 2), ("disaggregated", 1, None)}, name
        assert all(r.backend == "both" for r in exp.runs) and len(exp.rates) >= 4
