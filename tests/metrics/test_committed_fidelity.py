"""The committed fidelity tables (data/results/*/fidelity.csv) are what the simulator gives today: each is
recomputed here, from the committed records and profile table, and must match."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from pdlab.fidelity import REPLAY_SETTINGS, write_fidelity
from pdlab.sim.cost import parse_overhead_ms

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = sorted(p.parent for p in (ROOT / "data" / "results").glob("*/fidelity.csv"))


def test_there_are_committed_fidelity_tables():
    assert {p.name for p in COMMITTED} >= {"one_gpu_conversation", "one_gpu_code"}


@pytest.mark.parametrize("result", COMMITTED, ids=[p.name for p in COMMITTED])
def test_a_committed_fidelity_table_is_reproduced_from_its_records(result, tmp_path, monkeypatch):
    committed = pd.read_csv(result / "fidelity.csv", keep_default_na=False)
    settings = {name: committed[name].iloc[0] for name in REPLAY_SETTINGS}
    parse = {"profile": str, "step_overhead_ms": lambda v: parse_overhead_ms(str(v)), "mps_capacity": float}
    settings = {name: parse[name](v) for name, v in settings.items() if v != ""}
    copy = tmp_path / result.name
    shutil.copytree(result, copy, ignore=shutil.ignore_patterns("*.png", "logs", "fidelity.csv"))
    monkeypatch.chdir(ROOT)  # the table names its profile relative to the repository
    fresh = pd.read_csv(write_fidelity(copy, **settings), keep_default_na=False)
    assert list(fresh.columns) == list(committed.columns)
    assert fresh[["run", *REPLAY_SETTINGS, "metric"]].astype(str).equals(
        committed[["run", *REPLAY_SETTINGS, "metric"]].astype(str))
    for column in ("real", "sim", "error"):
        a = pd.to_numeric(fresh[column], errors="coerce")
        b = pd.to_numeric(committed[column], errors="coerce")
        assert ((a - b).abs() <= 1e-4 * b.abs() + 1e-9).where(b.notna(), a.isna()).all(), column
