"""Where the GPU waits during an engine step: its idle time, charged to what the host was doing then.

    python benchmarks/step_gaps.py --model llama3-8b --decode 1,64 --mixed 16:1,960:64 --out step_gaps.json

The phases of `engine.step()` (scheduling, planning, the input copies, graph replays, eager attention, LM head,
sampling, the scheduler's update, the outputs) run under torch.profiler labels. For a few steps of each kind,
the time between the step's start and its end in which no kernel or copy runs on the GPU is charged, in 10 us
slices, to the innermost label the host was in (`other`, when none, is mostly the engine loop's own code and
the step's outputs). Each label costs the profiler a few microseconds, so only phases that run once or once per
layer are labelled, and the same steps are also timed without the profiler (`wall_unprofiled_ms`). What a label
is charged is host work the
GPU waited for: the part of a step that CUDA graphs do not remove and that overlapping the host's work with
the GPU's would. Decode steps start from `batch` requests at `--context` tokens; a mixed step adds one prompt
of CHUNK tokens beside DECODES decoding requests (benchmarks/engine_speed.py's steps). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import DeviceType, ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_speed import start_decoding  # noqa: E402
from pdlab.engine import cuda_graphs, model_runner  # noqa: E402
from pdlab.engine.config import EngineConfig  # noqa: E402
from pdlab.engine.engine import LLMEngine  # noqa: E402
from pdlab.models import attention  # noqa: E402
from pdlab.models.transformer import Transformer  # noqa: E402
from pdlab.policy.scheduler import Scheduler  # noqa: E402
from pdlab.sampling_params import SamplingParams  # noqa: E402

SLICE_US = 10.0
# (owner, attribute, label): the phases of a step, each wrapped in a profiler label.
PHASES = [
    (Scheduler, "schedule", "schedule"),
    (Scheduler, "update", "update"),
    (model_runner.ModelRunner, "plan", "plan"),
    (model_runner.ModelRunner, "load", "load inputs"),
    (attention.AttentionContext, "build", "attention metadata"),
    (attention.AttentionContext, "attend", "attention (eager)"),
    (cuda_graphs.DecodeGraphs, "run", "decode graphs"),
    (cuda_graphs.MixedGraphs, "run", "piecewise graphs"),
    (torch.cuda.CUDAGraph, "replay", "graph replay"),
    (Transformer, "forward", "forward (eager)"),
    (Transformer, "compute_logits", "lm head"),
    (model_runner, "sample", "sample"),
]
LABELS = {label for _, _, label in PHASES} | {"step"}


def labelled(fn, label: str):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return wrapper


def install_labels() -> None:
    for owner, name, label in PHASES:
        setattr(owner, name, labelled(getattr(owner, name), label))


def charge_gaps(events, steps: int) -> list[dict]:
    """Per profiled step: wall and GPU busy ms, and the GPU's idle ms by the innermost host label."""
    cpu = [(e.time_range.start, e.time_range.end, e.name) for e in events
           if e.device_type == DeviceType.CPU and e.name in LABELS]
    gpu = sorted((e.time_range.start, e.time_range.end) for e in events
                 if e.device_type == DeviceType.CUDA and e.name not in LABELS)
    out = []
    for s0, s1, _ in sorted(r for r in cpu if r[2] == "step")[:steps]:
        spans = [(max(a, s0), min(b, s1)) for a, b in gpu if b > s0 and a < s1]
        busy, end, idle = 0.0, s0, []
        for a, b in spans:
            if a > end:
                idle.append((end, a))
            if b > end:
                busy += b - max(a, end)
                end = b
        if end < s1:
            idle.append((end, s1))
        inside = [r for r in cpu if r[0] < s1 and r[1] > s0 and r[2] != "step"]
        charged: dict[str, float] = {}
        for a, b in idle:
            t = a
            while t < b:
                mid = min(t + SLICE_US / 2, b)
                around = [r for r in inside if r[0] <= mid < r[1]]
                label = min(around, key=lambda r: r[1] - r[0])[2] if around else "other"
                charged[label] = charged.get(label, 0.0) + min(SLICE_US, b - t) / 1e3
                t += SLICE_US
        out.append({"wall_ms": (s1 - s0) / 1e3, "gpu_busy_ms": busy / 1e3, "idle_ms": charged})
    return out


def summarize(rows: list[dict]) -> dict:
    labels = sorted({k for r in rows for k in r["idle_ms"]})
    return {"wall_ms": statistics.median(r["wall_ms"] for r in rows),
            "gpu_busy_ms": statistics.median(r["gpu_busy_ms"] for r in rows),
            "idle_ms": {k: round(statistics.median(r["idle_ms"].get(k, 0.0) for r in rows), 3) for k in labels}}


def profiled(engine: LLMEngine, step, n: int = 5) -> dict:
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    walls = []
    for _ in range(2 + n):  # the first two warm up (and get past any first-time work)
        sync()
        t = time.perf_counter()
        step()
        sync()
        walls.append(time.perf_counter() - t)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            with record_function("step"):
                step()
                sync()
    return {"wall_unprofiled_ms": statistics.median(walls[2:]) * 1e3, **summarize(charge_gaps(prof.events(), n))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--decode", default="1,64")
    parser.add_argument("--mixed", default="16:1,960:64")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script (no GPU events)")
    parser.add_argument("--out", type=Path, default=Path("step_gaps.json"))
    args = parser.parse_args()
    from pdlab.provenance import provenance

    install_labels()
    decodes = [int(b) for b in args.decode.split(",") if b]
    mixed = [tuple(int(v) for v in m.split(":")) for m in args.mixed.split(",") if m]
    engine = LLMEngine(EngineConfig(
        model=args.model, dtype="bfloat16" if args.device == "cuda" else "float32", device=args.device, max_num_seqs=max(decodes + [d + 1 for _, d in mixed]),
        max_num_batched_tokens=8192, max_model_len=args.context + 256, gpu_memory_utilization=0.7,
        enforce_eager=args.enforce_eager))
    report = {"provenance": provenance(), "model": args.model, "context": args.context,
              "enforce_eager": args.enforce_eager, "decode": [], "mixed": []}
    gen = torch.Generator().manual_seed(0)
    for batch in decodes:
        start_decoding(engine, batch, args.context, 20, gen, f"d{batch}")
        row = {"batch": batch, **profiled(engine, engine.step)}
        report["decode"].append(row)
        print(json.dumps(row), flush=True)
        for rid in list(engine.scheduler.requests):
            engine.abort(rid)
    for chunk, batch in mixed:
        start_decoding(engine, batch, args.context, 20, gen, f"m{chunk}-{batch}")

        def step(chunk=chunk) -> None:
            engine.add_request(torch.randint(100, 30000, (chunk,), generator=gen).tolist(),
                               SamplingParams(max_tokens=1, temperature=0))
            engine.step()
        row = {"chunk": chunk, "decodes": batch, **profiled(engine, step)}
        report["mixed"].append(row)
        print(json.dumps(row), flush=True)
        for rid in list(engine.scheduler.requests):
            engine.abort(rid)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
