"""Where a result came from: git commit, software versions, the device, and how busy the machine was."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import time
from dataclasses import dataclass, field
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


def _own_cpu_s() -> float:
    """CPU seconds of this process and of its children that have ended and been waited for (with theirs)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _machine_cpu_s() -> float | None:
    """CPU seconds every process of the machine has used since boot, time stolen by the hypervisor included
    (Linux's /proc/stat); None elsewhere."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (ticks + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class LoadWatch:
    """How busy the machine was while a run went on, besides the run itself: made as the run starts,
    read (`report`; `busy_warning`) once its processes have ended and been waited for, so that their CPU counts.

    Others' CPU = every CPU second the machine spent (steal included) minus this run's. Load averages would
    also count this run's own threads that wait for a core, so they are only recorded, not judged."""

    start_s: float = field(default_factory=time.monotonic)
    start_own_cpu_s: float = field(default_factory=_own_cpu_s)
    start_machine_cpu_s: float | None = field(default_factory=_machine_cpu_s)

    def report(self) -> dict[str, object]:
        wall_s = max(time.monotonic() - self.start_s, 1e-9)
        num_cpus = os.cpu_count() or 1
        report: dict[str, object] = {"num_cpus": num_cpus, "load_1m_5m_15m": [round(x, 2) for x in os.getloadavg()],
                                     "run_cores": round((_own_cpu_s() - self.start_own_cpu_s) / wall_s, 2)}
        machine = _machine_cpu_s()
        if machine is None or self.start_machine_cpu_s is None:
            return {**report, "other_cores": None, "busy": None}
        others = max(0.0, (machine - self.start_machine_cpu_s) / wall_s - report["run_cores"])
        return {**report, "other_cores": round(others, 2), "busy": others >= max(0.5, 0.25 * num_cpus)}



def busy_warning(report: dict, what: str) -> str | None:
    """One line when a `LoadWatch.report()` says other processes kept half a core (or a quarter of the
    cores) busy, else None."""
    if not report.get("busy"):
        return None
    return (f"warning: the machine was busy while {what} ran: other processes used {report['other_cores']:g} of its "
            f"{report['num_cpus']} CPUs (this run {report['run_cores']:g}); its timings may be slow and noisy")


def provenance(load: dict | None = None) -> dict[str, object]:
    """`load`: a `LoadWatch.report()` of the run; without one, the machine's load averages now."""
    if load is None:
        load = {"num_cpus": os.cpu_count(), "load_1m_5m_15m": [round(x, 2) for x in os.getloadavg()]}
    return {"git_commit": git_commit(), "versions": versions(), "device": device_info(),
            "platform": platform.platform(), "load": load}
