"""CUDA MPS SM limits on this GPU: does a client's limit slow a compute-bound loop, alone and beside another?

    python benchmarks/mps_split.py --out data/bench/mps_split.json      (a GPU; root, for the MPS daemon)

Each measurement is a separate process running bf16 matmuls (8192^3) for a fixed number of iterations,
started with `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` (what an instance's `--sm-percentage` sets), and reports
its TFLOP/s. Done three ways, in one run: no MPS (plain processes, time-sliced when two run), an MPS daemon
with per-client limits, and one with per-context SM partitioning
(`CUDA_MPS_ENABLE_PER_CTX_DEVICE_MULTIPROCESSOR_PARTITIONING=1`, as Semi-PD uses). Pairs run two clients at
once (e.g. 60% + 40%): under a real partition each gets about its share of the SMs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORKER = """
import sys, time, torch
n, iters = 8192, int(sys.argv[1])
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ b
torch.cuda.synchronize()
print("ready", flush=True)
sys.stdin.readline()  # start together with the other client
t = time.perf_counter()
for _ in range(iters):
    a @ b
torch.cuda.synchronize()
s = time.perf_counter() - t
print(f"{2 * n**3 * iters / s / 1e12:.1f}", flush=True)
"""


def run_clients(percentages: list[int | None], env: dict[str, str], iters: int) -> list[float]:
    """Start one worker per percentage (None: no limit), release them together, return their TFLOP/s."""
    procs = []
    for pct in percentages:
        penv = {**os.environ, **env}
        if pct is not None:
            penv["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(pct)
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(iters)], env=penv, text=True,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE))
    for p in procs:
        line = p.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"a worker failed to start (exit {p.wait()})")
    for p in procs:
        p.stdin.write("\n")
        p.stdin.flush()
    return [float(p.communicate(timeout=300)[0].strip()) for p in procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "bench" / "mps_split.json")
    parser.add_argument("--iters", type=int, default=400)
    args = parser.parse_args()
    from pdlab.cluster.mps import MpsDaemon
    from pdlab.provenance import provenance

    singles, pairs = [100, 50, 20], [(60, 40), (70, 100)]
    rows = []

    def measure(mode: str, env: dict[str, str], limited: bool) -> None:
        for pct in singles if limited else [None]:
            rows.append({"mode": mode, "clients": [pct], "tflops": run_clients([pct], env, args.iters)})
            print(json.dumps(rows[-1]), flush=True)
        for pair in pairs if limited else [(None, None)]:
            rows.append({"mode": mode, "clients": list(pair), "tflops": run_clients(list(pair), env, args.iters)})
            print(json.dumps(rows[-1]), flush=True)

    measure("no-mps", {}, limited=False)
    for per_context in (False, True):
        with MpsDaemon(per_context=per_context) as daemon:
            measure("mps-per-context" if per_context else "mps-per-client", daemon.env, limited=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"provenance": provenance(), "iters": args.iters, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
