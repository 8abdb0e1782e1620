"""wint8/wint4 linears against bf16 F.linear on llama3-8b's merged shapes, on one GPU.

    python benchmarks/wint_matmul.py --out data/bench/wint_matmul.json
    python benchmarks/wint_matmul.py --sweep --m 1,16,64 --out data/bench/wint_matmul_sweep.json

Measured in the same run, on the same card: bf16 F.linear (cuBLAS) for each
shape and M, and a 1 GiB device-to-device copy (read + write counted, as
docs/facts.md does) as the bandwidth baseline. For each shape, M and method it
prints the median time (triton.testing.do_bench, which flushes L2 before every
run: weights come from HBM, as in a decode step), the speedup over bf16, and
the bytes moved per second as a share of the copy's. For M >= 256 it times both
paths (fused kernel and dequantize + cuBLAS) so that the crossover that sets
`DEQUANT_MIN_M` can be read off. `--sweep` times a grid of tile configurations
of the fused kernel per shape and M and reports the best against
`pick_config`'s choice (each M of --m below DEQUANT_MIN_M; 40 configurations
each, some minutes).
Every result is checked against the reference first.

These are eager launches: below ~50 us a kernel's time here is the host's launch cost (on an H200 the
wint kernels showed 60-150 us that graph replay puts at 12-70 us). benchmarks/decode_breakdown.py times
the same linears replayed in CUDA graphs, as decode steps run them, over weight copies larger than L2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdlab.models.kernels import wint_matmul as wm  # noqa: E402
from pdlab.models.quant import METHODS, quantize  # noqa: E402

# llama3-8b's linears, merged as pdlab's transformer holds them: (name, N = out, K = in).
SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]


def bench_ms(fn, rep_ms: int = 100) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def copy_bandwidth_Bps() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a))
    del a, b
    return 2 * (1 << 30) / (ms * 1e-3)


def check(out: torch.Tensor, x: torch.Tensor, w) -> float:
    """Largest error relative to the largest reference value; raises when past bf16's rounding."""
    ref = x.float() @ w.dequantize(torch.float32).T
    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    if not err < 2e-2:
        raise AssertionError(f"{w.method.name} {tuple(w.shape)} M={x.shape[0]}: relative error {err:.3g}")
    return err


def moved_bytes(m: int, n: int, k: int, weight_bytes: int) -> int:
    return weight_bytes + m * k * 2 + m * n * 2  # weight, x, out (bf16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", default="1,16,64,256", help="batch sizes (rows of x)")
    parser.add_argument("--large-m", default="256,512,1024,2048",
                        help="batch sizes at which both paths are timed, for DEQUANT_MIN_M")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of fused-kernel tile configurations")
    parser.add_argument("--out", type=Path, default=Path("data/bench/wint_matmul.json"))
    args = parser.parse_args()
    from pdlab.provenance import provenance

    torch.manual_seed(0)
    copy_Bps = copy_bandwidth_Bps()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"copy {copy_Bps / 1e9:.0f} GB/s, {num_sms} SMs; DEQUANT_MIN_M = {wm.DEQUANT_MIN_M}", flush=True)
    ms_list = [int(m) for m in args.m.split(",") if m]
    large = [int(m) for m in args.large_m.split(",") if m]
    report = {"provenance": provenance(), "copy_GBps": copy_Bps / 1e9, "num_sms": num_sms,
              "dequant_min_m": wm.DEQUANT_MIN_M, "rows": [], "crossover": [], "sweep": []}
    for name, n, k in SHAPES:
        w16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        weights = {method: quantize(w16, METHODS[method]) for method in ("wint8", "wint4")}
        for m in sorted(set(ms_list) | set(large)):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16_ms = bench_ms(lambda: F.linear(x, w16))
            row = {"shape": name, "n": n, "k": k, "m": m, "bf16_us": bf16_ms * 1e3,
                   "bf16_copy_share": moved_bytes(m, n, k, n * k * 2) / (bf16_ms * 1e-3) / copy_Bps}
            for method, w in weights.items():
                err = check(wm.wint_linear(x, w), x, w)
                t = bench_ms(lambda: wm.wint_linear(x, w))
                row |= {f"{method}_us": t * 1e3, f"{method}_speedup": bf16_ms / t, f"{method}_rel_err": err,
                        f"{method}_copy_share": moved_bytes(m, n, k, w.nbytes) / (t * 1e-3) / copy_Bps}
                if m in large:  # both paths, whatever the threshold says
                    fused = bench_ms(lambda: wm.wint_matmul(x, w))
                    dequant = bench_ms(lambda: F.linear(x, wm.dequantize_weight(w, x.dtype)))
                    report["crossover"].append({"shape": name, "m": m, "method": method, "fused_us": fused * 1e3,
                                                "dequant_cublas_us": dequant * 1e3, "bf16_us": bf16_ms * 1e3})
                    print(f"  {name:8s} M={m:5d} {method}: fused {fused * 1e3:8.1f} us, dequant+cuBLAS "
                          f"{dequant * 1e3:8.1f} us, bf16 {bf16_ms * 1e3:8.1f} us", flush=True)
            if m in ms_list:
                report["rows"].append(row)
                print(f"{name:8s} M={m:5d}  bf16 {row['bf16_us']:7.1f} us ({row['bf16_copy_share']:4.0%} of copy)  "
                      + "  ".join(f"{q} {row[q + '_us']:7.1f} us x{row[q + '_speedup']:.2f} "
                                  f"({row[q + '_copy_share']:4.0%})" for q in weights), flush=True)
            if args.sweep and m in ms_list and m < wm.DEQUANT_MIN_M:
                report["sweep"] += sweep(name, x, weights, num_sms)
        del w16, weights
        torch.cuda.empty_cache()
    for m in ms_list:  # one layer's four linears: what a decode step spends per layer
        rows = [r for r in report["rows"] if r["m"] == m]
        bf16 = sum(r["bf16_us"] for r in rows)
        print(f"one layer's linears, M={m}: bf16 {bf16:.1f} us; " + ", ".join(
            f"{q} {sum(r[q + '_us'] for r in rows):.1f} us (x{bf16 / sum(r[q + '_us'] for r in rows):.2f})"
            for q in ("wint8", "wint4")))
    crossing = {}
    for c in report["crossover"]:
        if c["dequant_cublas_us"] < c["fused_us"]:
            key = (c["shape"], c["method"])
            crossing[key] = min(crossing.get(key, c["m"]), c["m"])
    print("smallest M where dequantize + cuBLAS beats the fused kernel:",
          {f"{s}/{q}": m for (s, q), m in sorted(crossing.items())} or "none measured")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


def sweep(name: str, x: torch.Tensor, weights: dict, num_sms: int) -> list[dict]:
    m, k = x.shape
    results = []
    for method, w in weights.items():
        n = w.shape[0]
        chosen = wm.pick_config(m, n, k, w.method.bits, w.group_size, num_sms)
        chosen_us = bench_ms(lambda: wm.wint_matmul(x, w, config=chosen)) * 1e3
        best = (chosen_us, chosen)
        block_m = chosen.block_m
        for block_n, split_k, stages in itertools.product((16, 32, 64, 128), (1, 2, 4, 8, 16), (3, 4)):
            c = wm.TileConfig(block_m, block_n, chosen.block_k, split_k, chosen.num_warps, stages)
            try:
                check(wm.wint_matmul(x, w, config=c), x, w)
                us = bench_ms(lambda: wm.wint_matmul(x, w, config=c), rep_ms=30) * 1e3
            except Exception as e:  # out of shared memory or registers: not a candidate
                print(f"    skip {c}: {type(e).__name__}", flush=True)
                continue
            best = min(best, (us, c), key=lambda b: b[0])
        us, c = best
        results.append({"shape": name, "m": m, "method": method, "chosen": asdict(chosen), "chosen_us": chosen_us,
                        "best": asdict(c), "best_us": us})
        print(f"  sweep {name:8s} M={m:4d} {method}: pick_config {chosen_us:7.1f} us, best {us:7.1f} us with {c}",
              flush=True)
    return results


if __name__ == "__main__":
    main()
