"""Where a decode step's time goes: the CUDA graph's GPU time against the whole step, and the host's share.

    python benchmarks/decode_breakdown.py --model llama3-8b --variants bf16,wint4 --batches 1,64,128

For each variant and batch (context 1k), measured on the same card in the same run:
- step_ms: median wall time of `engine.step()` (what benchmarks/engine_speed.py reports);
- graph_ms: median GPU time of replaying the step's CUDA graph alone (CUDA events), i.e. the
  model's forward pass without the host;
- head_ms: the LM head and greedy sampling on that batch's hidden states (outside the graph);
- host_ms: step_ms - graph_ms - head_ms, the host's part (scheduling, building inputs, copies,
  outputs) that the GPU waits for;
- the top host functions of a few steps under cProfile.
Then the decode-step linears alone, each replayed in a CUDA graph over enough copies of the
weight that it comes from HBM (not L2): bf16 F.linear against wint_linear's choice (benchmarks/wint_kernels.py
times every kernel and tile configuration).
Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_timing import gpu_ms  # noqa: E402  (this folder: the script's)
from pdlab.engine.config import EngineConfig  # noqa: E402
from pdlab.engine.engine import LLMEngine  # noqa: E402
from pdlab.sampling_params import SamplingParams  # noqa: E402

SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]


def fill(engine: LLMEngine, batch: int, context: int) -> None:
    gen = torch.Generator().manual_seed(batch)
    for i in range(batch):
        prompt = torch.randint(100, 30000, (context,), generator=gen).tolist()
        engine.add_request(prompt, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), f"d{batch}-{i}")
    while any(r.num_output_tokens == 0 for r in engine.scheduler.requests.values()):
        engine.step()


@torch.inference_mode()
def breakdown(engine: LLMEngine, batch: int, context: int) -> dict:
    fill(engine, batch, context)
    times = []
    for _ in range(12):
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step_ms = statistics.median(times[2:]) * 1e3
    graphs = engine.runner.graphs
    size = next(s for s in graphs.sizes if s >= batch)
    graph_ms = gpu_ms(graphs.graphs[size].replay)
    hidden = graphs.outputs[size][:batch]
    head_ms = gpu_ms(lambda: engine.runner.model.compute_logits(hidden).argmax(dim=-1).tolist())
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
    for rid in list(engine.scheduler.requests):
        engine.abort(rid)
    return {"batch": batch, "context": context, "step_ms": step_ms, "graph_ms": graph_ms, "head_ms": head_ms,
            "host_ms": step_ms - graph_ms - head_ms, "replays": graphs.num_replays,
            "host_profile": text.getvalue().splitlines()[-26:]}


@torch.inference_mode()
def linears(methods: list[str], ms: list[int]) -> list[dict]:
    """Each linear of a decode step replayed in a CUDA graph over weight copies that exceed L2 4x."""
    from pdlab.models.kernels.wint_linear import wint_linear
    from pdlab.models.quant import METHODS, quantize

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    for name, n, k in SHAPES:
        w16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for method in methods:
            w = w16 if method == "bf16" else quantize(w16, METHODS[method])
            nbytes = n * k * 2 if method == "bf16" else w.nbytes
            copies = max(2, -(-4 * l2 // nbytes))
            ws = [w16.clone() for _ in range(copies)] if method == "bf16" else [
                type(w)(w.method, w.qweight.clone(), w.scales.clone(), w.shape, w.dtype) for _ in range(copies)]
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                fn = (lambda x=x, ws=ws: [F.linear(x, c) for c in ws]) if method == "bf16" else (
                    lambda x=x, ws=ws: [wint_linear(x, c) for c in ws])
                fn()
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    fn()
                us = gpu_ms(graph.replay) * 1e3 / copies
                rows.append({"shape": name, "n": n, "k": k, "m": m, "method": method, "graph_us": us,
                             "GBps": nbytes / (us * 1e-6) / 1e9})
                print(json.dumps(rows[-1]), flush=True)
                del graph
            del ws, w
            gc.collect()
            torch.cuda.empty_cache()
        del w16
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--variants", default="bf16,wint4")
    parser.add_argument("--batches", default="1,64,128")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--linear-m", default="1,16,64")
    parser.add_argument("--skip-engine", action="store_true", help="only the linears")
    parser.add_argument("--out", type=Path, default=Path("decode_breakdown.json"))
    args = parser.parse_args()
    from pdlab.provenance import provenance

    report = {"provenance": provenance(), "model": args.model, "variants": {}, "linears": []}
    batches = [int(b) for b in args.batches.split(",")]
    for variant in [] if args.skip_engine else args.variants.split(","):
        engine = LLMEngine(EngineConfig(
            model=args.model, dtype="bfloat16", device="cuda", max_num_seqs=max(batches), max_num_batched_tokens=8192,
            max_model_len=4096, gpu_memory_utilization=0.5, quantization=None if variant == "bf16" else variant))
        rows = []
        for batch in batches:
            rows.append(breakdown(engine, batch, args.context))
            print(variant, json.dumps({k: v for k, v in rows[-1].items() if k != "host_profile"}), flush=True)
            print("\n".join(rows[-1]["host_profile"]), flush=True)
        report["variants"][variant] = rows
        engine.close()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
        args.out.write_text(json.dumps(report, indent=2))
    report["linears"] = linears(["bf16", "wint8", "wint4"], [int(m) for m in args.linear_m.split(",")])
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
