"""Where a result came from: git commit, software versions, the device."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path


def git_commit(repo: Path | None = None) -> str | None:
    """HEAD (with -dirty), or $PDLAB_GIT_COMMIT where the tree was copied without .git (the GPU machine)."""
    if os.environ.get("PDLAB_GIT_COMMIT"):
        return os.environ["PDLAB_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo or Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo or Path(__file__).parent,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def versions(packages=("pdlab", "torch", "transformers", "triton", "numpy", "simpy")) -> dict[str, str | None]:
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def device_info() -> dict[str, object]:
    info: dict[str, object] = {"host_cpu": platform.processor() or platform.machine()}
    try:
        import torch
    except ImportError:
        return info
    info["cuda"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda_version"] = torch.version.cuda
    return info


def provenance() -> dict[str, object]:
    return {"git_commit": git_commit(), "versions": versions(), "device": device_info(), "platform": platform.platform()}
