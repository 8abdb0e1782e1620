"""`pdlab.provenance`: how busy the machine was while a run went on, besides the run itself."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pdlab.provenance import LoadWatch, busy_warning, provenance

BURN = "while True: pass"
needs_proc_stat = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="the machine's CPU time is Linux's")


@needs_proc_stat
def test_a_process_burning_a_core_beside_the_run_makes_the_machine_busy():
    watch = LoadWatch()
    other = subprocess.Popen([sys.executable, "-c", BURN])  # not waited for before the report: not the run's
    try:
        time.sleep(2.0)
        report = watch.report()
    finally:
        other.kill()
        other.wait()
    assert report["busy"] and report["other_cores"] >= 0.6, report
    warning = busy_warning(report, "the 1p1d deployment")
    assert warning.startswith("warning: the machine was busy while the 1p1d deployment ran: other processes used")


@needs_proc_stat
def test_the_runs_own_processes_count_as_the_run_once_waited_for():
    watch = LoadWatch()
    mine = subprocess.Popen([sys.executable, "-c", BURN])
    time.sleep(2.0)
    mine.kill()
    mine.wait()
    report = watch.report()
    assert report["run_cores"] >= 0.6, report


def test_provenance_records_the_machines_load():
    load = provenance()["load"]
    assert load["num_cpus"] == os.cpu_count() and len(load["load_1m_5m_15m"]) == 3
    report = {"busy": False, "other_cores": 0.1, "num_cpus": 2, "run_cores": 1.0}
    assert provenance(load=report)["load"] == report and busy_warning(report, "x") is None
