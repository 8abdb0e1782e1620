"""The repository stands alone: no file cites a document outside it.

Whoever clones pdlab has only the repository, so a comment, docstring, doc or notebook that sends the
reader to the notes beside it (the shared folder, the design and FastDeploy notes, the research notes)
sends them nowhere; what
they need lives in docs/ (docs/facts.md, docs/fastdeploy.md). The one exception: the Azure traces are
kept beside the repository, never in it, and the tests and notebooks that read them skip without them;
a line that names the traces may point there.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The patterns are spelled in pieces, so that this file does not match itself.
SHARED, NOTES = r"\.\./" + "shared", ("DESIGN", "FASTDEPLOY", "STYLE")
CITATION = re.compile("|".join([SHARED, *(rf"\b{n}\.md" for n in NOTES), r"(?<![\w/.])" + "re" + "search/"]))
SKIPPED_DIRS = {".git", ".venv", "__pycache__", "results", "build", "dist", ".whl", ".pytest_cache",
                ".hypothesis", ".ipynb_checkpoints", "log", "gpu-out"}


def repository_files() -> list[Path]:
    """The files git would commit (tracked, or new and not ignored); every file but build outputs without git."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, capture_output=True, check=True).stdout
        return [REPO / name for name in out.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for root, dirs, names in os.walk(REPO):
            dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
            files += [Path(root) / n for n in names]
        return files


def is_citation(line: str) -> bool:
    return bool(CITATION.search(line)) and "traces" not in line


def citations(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
        return []  # binary (images), or deleted but still listed by git
    return [f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}"
            for number, line in enumerate(text.splitlines(), 1)
            if is_citation(line)]


def test_no_file_cites_a_path_outside_the_repository():
    found = [hit for path in repository_files() for hit in citations(path)]
    assert not found, "citations of files outside the repository (restate what is needed in docs/):\n" + "\n".join(found)


def test_the_check_catches_each_kind_of_citation():
    assert is_citation("# see ../" + "shared/notes.md")
    assert is_citation("# as " + "DESIGN" + ".md says") and is_citation("# see " + "FASTDEPLOY" + ".md")
    assert is_citation("# from " + "re" + "search/simulators.md")
    assert not is_citation("# docs/facts.md, tests/research/x.py")
    assert not is_citation("TRACES = '../" + "shared/data/traces'  # the optional traces")
