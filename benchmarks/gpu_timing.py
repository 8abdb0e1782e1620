"""Timing helpers the GPU benchmarks share (imported by name: each benchmark runs as a script from this folder)."""

from __future__ import annotations

import functools

import statistics

import torch


def gpu_ms(fn, reps: int = 20) -> float:
    """Median GPU time of `fn()` in milliseconds (CUDA events), after one untimed call."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def median_ms(fn) -> float:
    """Median time of `fn()` by triton.testing.do_bench, which flushes L2 before every run."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth_Bps() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, read + write counted (docs/facts.md's convention)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    ms = median_ms(functools.partial(torch.empty_like(src).copy_, src))
    del src
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / (ms * 1e-3)
