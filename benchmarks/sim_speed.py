"""Simulator speed: 10k requests on a 16-instance cluster (8 prefill + 8 decode, both routings, and 16 mixed), one core.

    python benchmarks/sim_speed.py [--num-requests 10000] [--rate-rps 100]

Target (docs/facts.md): <= 10 s of wall time per run. The workload is ShareGPT-like
(lognormal prompts, median 512 tokens; lognormal outputs, median 128), llama3-8b
on H100 with the roofline cost model, KV over NVLink. Prints wall seconds,
simulated seconds, steps and scheduled tokens per wall second.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from pdlab.metrics.summary import summarize
from pdlab.models.presets import PRESETS
from pdlab.policy.scheduler import SchedulerConfig
from pdlab.sim import LINKS, InstanceSpec, Layout, RooflineCost, simulate_cluster
from pdlab.workload import LognormalLength, PoissonArrivals, WorkloadSpec, make_workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-requests", type=int, default=10_000)
    parser.add_argument("--rate-rps", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here, e.g. data/bench/sim_speed.json")
    args = parser.parse_args()

    model = PRESETS["llama3-8b"]
    cost = RooflineCost(model)
    spec = WorkloadSpec(args.num_requests, PoissonArrivals(args.rate_rps),
                        LognormalLength(512, 0.8, 8, 4096), LognormalLength(128, 0.8, 4, 1024))
    requests = make_workload(spec, vocab_size=model.vocab_size, seed=args.seed)
    config = SchedulerConfig(max_num_seqs=128, max_num_batched_tokens=8192, max_model_len=8192)
    instance = InstanceSpec(config, num_blocks=cost.max_num_blocks(16), block_size=16)
    layouts = {
        "8P+8D": Layout(instance, mode="disaggregated", num_prefill=8, num_decode=8, link=LINKS["nvlink"],
                        kv_bytes_per_token=model.kv_bytes_per_token(2), num_layers=model.num_layers),
        "8P+8D splitwise": Layout(instance, mode="disaggregated", num_prefill=8, num_decode=8, link=LINKS["nvlink"],
                                  kv_bytes_per_token=model.kv_bytes_per_token(2), num_layers=model.num_layers,
                                  routing="splitwise", heartbeat_s=0.2),
        "16 mixed": Layout(instance, mode="colocated", num_instances=16),
    }
    results = []
    for name, layout in layouts.items():
        start = time.perf_counter()
        records, cluster = simulate_cluster(requests, layout, cost, seed=args.seed)
        wall_s = time.perf_counter() - start
        steps = sum(i.num_steps for i in cluster.instances)
        tokens = sum(r.num_prompt_tokens + r.num_output_tokens for r in records)
        s = summarize(records)
        print(f"{name:15s} {len(records)} requests: wall {wall_s:.2f} s, simulated {max(r.finish_s for r in records):.1f} s, "
              f"{steps} steps ({steps / wall_s:,.0f}/s), {tokens / wall_s:,.0f} tokens/s; "
              f"ttft p50 {s['ttft_p50_ms']:.1f} ms, tpot p50 {s['tpot_p50_ms']:.1f} ms, "
              f"output {s['output_throughput_tokens_per_s']:,.0f} tok/s")
        results.append({"layout": name, "num_requests": len(records), "wall_s": wall_s, "num_steps": steps,
                        "simulated_s": max(r.finish_s for r in records), "ttft_p50_ms": s["ttft_p50_ms"],
                        "tpot_p50_ms": s["tpot_p50_ms"]})
    if args.out is not None:
        from pdlab.provenance import git_commit, versions

        meta = {"git_commit": git_commit(), "versions": versions(("pdlab", "numpy", "simpy")),
                "cpu": platform.processor() or platform.machine(), "rate_rps": args.rate_rps, "seed": args.seed}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"provenance": meta, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
