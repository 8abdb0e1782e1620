"""Fixtures and settings shared by every test package."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. `triton.jit`
# reads this when it decorates a kernel, so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_RESULTS = Path(__file__).resolve().parents[1] / "results"  # `make demo` writes there: the user's


def files_and_mtimes(directory: Path) -> dict[str, int]:
    """Every file under `directory` with its modification time (ns); {} where there is no directory."""
    found = {}
    for parent, _, names in os.walk(directory):
        for name in names:
            path = Path(parent, name)
            try:
                found[str(path.relative_to(directory))] = path.stat().st_mtime_ns
            except FileNotFoundError:  # removed meanwhile
                pass
    return found


@pytest.fixture(autouse=True)
def results_untouched():
    """Tests write only under temporary directories: one that changes the repository's results/ fails."""
    before = files_and_mtimes(REPO_RESULTS)
    yield
    after = files_and_mtimes(REPO_RESULTS)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert not changed, f"the test wrote into the repository's results/ (use a temporary directory): {changed[:5]}"
