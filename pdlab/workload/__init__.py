"""Workloads: arrival processes, length distributions, trace replay, and the requests they make."""

from pdlab.workload.arrivals import (
    ArrivalProcess,
    BurstArrivals,
    ConstantArrivals,
    GammaArrivals,
    PoissonArrivals,
    TraceArrivals,
)
from pdlab.workload.lengths import EmpiricalLength, FixedLength, LengthDistribution, LognormalLength, UniformLength
from pdlab.workload.traces import load_trace, replay_arrivals, trace_arrivals, trace_lengths, trace_stats
from pdlab.workload.workload import RequestSpec, WorkloadSpec, make_workload

__all__ = [
    "ArrivalProcess",
    "BurstArrivals",
    "ConstantArrivals",
    "EmpiricalLength",
    "FixedLength",
    "GammaArrivals",
    "LengthDistribution",
    "LognormalLength",
    "PoissonArrivals",
    "RequestSpec",
    "TraceArrivals",
    "UniformLength",
    "WorkloadSpec",
    "load_trace",
    "make_workload",
    "replay_arrivals",
    "trace_arrivals",
    "trace_lengths",
    "trace_stats",
]
