"""Every notebook runs top to bottom (headless, CPU, short settings through PDLAB_QUICK), writing its results
into the test's temporary directory (PDLAB_RESULTS_DIR): the repository's results/ stays as the user left it
(tests/conftest.py fails any test that changes it)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    monkeypatch.setenv("PDLAB_QUICK", "1")
    monkeypatch.setenv("PDLAB_RESULTS_DIR", str(tmp_path))
    nb = nbformat.read(path, as_version=4)
    # A cell's limit well inside pytest's 600 s, so that a stuck cell fails naming itself (one CI run saw
    # notebook 03 wait 10 minutes on an idle kernel; it runs in ~20 s).
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
