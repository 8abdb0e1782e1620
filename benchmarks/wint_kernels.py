"""Every kernel that can compute a wint8/wint4 linear, per batch size M, against bf16 on the same card.

    python benchmarks/wint_kernels.py --out data/bench/wint_kernels_h100.json --write-table
    python benchmarks/wint_kernels.py --quick      # only bf16 and what wint_linear picks

For llama3-8b's four merged linears, each method (wint8, wint4) and each M, it times (CUDA graphs replayed
over enough copies of the weight to exceed L2 4x, so that weights come from HBM as in a decode step; the
graph hides the host's launch cost as the engine's decode graphs do):
- bf16: F.linear (cuBLAS) on the bf16 weight, the baseline of every ratio;
- gemv: the no-loop kernel (`wint_gemv`) over a grid of (block_n, block_k, warps), M <= 16;
- mma: the looping tl.dot kernel (`wint_matmul`) over a grid of tiles, M >= 8;
- dequant: dequantize into a scratch weight + cuBLAS, M >= 64;
- tinygemm: PyTorch's `_weight_int4pack_mm` (wint4, same group size, for reference only: pdlab does not use it);
- picked: what `wint_linear` runs for that M (before this run's table, with --write-table).
`--write-table` writes the fastest of gemv, mma and dequant for each (bits, N, K, M) to this card's table,
pdlab/models/kernels/configs/wint_<card>.json, which `wint_linear` reads from then on.
Each row gives microseconds, GB/s of the method's weight bytes and the share of a device-to-device copy's
bandwidth (read + write counted). Every kernel's output is checked against the reference first.
Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_timing import copy_bandwidth_Bps, gpu_ms  # noqa: E402  (this folder: the script's)
from pdlab.models.kernels import wint_linear as wl  # noqa: E402
from pdlab.models.kernels import wint_matmul as wm  # noqa: E402
from pdlab.models.quant import METHODS, quantize  # noqa: E402

SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)]


def graphed_us(call, weights) -> float:
    """Microseconds per call of `call(w)`, replayed in a CUDA graph over every copy in `weights`."""
    for w in weights[:2]:
        call(w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            call(w)
    graph.replay()
    us = gpu_ms(graph.replay) * 1e3 / len(weights)
    del graph
    return us


def tinygemm(w16: torch.Tensor, group: int):
    """PyTorch's int4 kernel on the same symmetric quantization: (q - 8) * scale, zero 0. None if unavailable."""
    try:
        q = quantize(w16, METHODS["wint4"])
        ints = (q.int_values().to(torch.int32) + 8)  # 1..15
        packed = (ints[:, ::2] << 4 | ints[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
        sz = torch.stack([q.scales.T, torch.zeros_like(q.scales.T)], dim=-1).to(torch.bfloat16).contiguous()
        return lambda x, p=packed: torch.ops.aten._weight_int4pack_mm(x, p, group, sz), q
    except Exception as e:  # noqa: BLE001 - an op this torch build lacks: no reference row
        print(f"tinygemm unavailable: {type(e).__name__}: {str(e)[:120]}", flush=True)
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", default="1,2,4,8,16,32,64,128,256,512,2048")
    parser.add_argument("--quick", action="store_true", help="only bf16 and what wint_linear picks")
    parser.add_argument("--compile-only", default="", metavar="I/P",
                        help="only run part I of P of the candidates once on the first shape (fills Triton's cache; "
                             "start P such processes side by side before the timed run)")
    parser.add_argument("--write-table", action="store_true", help="write the fastest choices to this card's table")
    parser.add_argument("--out", type=Path, default=Path("wint_kernels.json"))
    args = parser.parse_args()
    from pdlab.provenance import provenance

    ms = [int(v) for v in args.m.split(",")]
    props = torch.cuda.get_device_properties(0)
    copy = copy_bandwidth_Bps() / 1e9
    print(f"{props.name}: copy {copy:.0f} GB/s, L2 {props.L2_cache_size >> 20} MiB, {props.multi_processor_count} SMs",
          flush=True)
    rows = []

    def record(shape, method, m, kernel, config, us, nbytes):
        gbps = nbytes / (us * 1e-6) / 1e9
        rows.append({"shape": shape, "method": method, "m": m, "kernel": kernel, "config": config, "us": us,
                     "GBps": gbps, "of_copy": gbps / copy})

    for name, n, k in SHAPES:
        w16 = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        copies16 = [w16] + [w16.clone() for _ in range(max(1, -(-4 * props.L2_cache_size // (n * k * 2)) - 1))]
        bf16_us = {}
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16_us[m] = graphed_us(lambda w, x=x: F.linear(x, w), copies16)
            record(name, "bf16", m, "cublas", None, bf16_us[m], n * k * 2)
        del copies16
        for method in ("wint8", "wint4"):
            w = quantize(w16, METHODS[method])
            copies = [w] + [type(w)(w.method, w.qweight.clone(), w.scales.clone(), w.shape, w.dtype)
                            for _ in range(max(1, -(-4 * props.L2_cache_size // w.nbytes) - 1))]
            ref_w = w.dequantize(torch.float32)
            tg = tinygemm(w16, w.group_size) if method == "wint4" else None
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = x.float() @ ref_w.T
                candidates = [("picked", None, lambda c, x=x: wl.wint_linear(x, c))]
                if not args.quick:
                    if m <= 16:
                        for bn, bk, warps in itertools.product((8, 16, 32), (512, 1024, 2048), (4, 8)):
                            g = wm.GemvConfig(bn, max(bk, w.group_size), warps)
                            candidates.append(("gemv", g, lambda c, x=x, g=g: wm.wint_gemv(x, c, config=g)))
                    if m >= 1:
                        pick = wm.pick_config(m, n, k, w.method.bits, w.group_size, props.multi_processor_count)
                        block_m = max(16, min(128, triton.next_power_of_2(m)))
                        for bn, bk, warps, stages, split in itertools.product(
                                (64, 128), (64, 128), (4, 8), (3, 4), sorted({1, pick.split_k, 2 * pick.split_k if m < 128 else 1})):
                            t = wm.TileConfig(block_m, bn, bk, split, warps, stages)
                            candidates.append(("mma", t, lambda c, x=x, t=t: wm.wint_matmul(x, c, config=t)))
                    if m >= 64:
                        candidates.append(("dequant", None, lambda c, x=x: F.linear(x, wm.dequantize_weight(c, x.dtype))))
                    if tg is not None and m <= 256:
                        candidates.append(("tinygemm", None, lambda c, x=x, tg=tg: tg[0](x)))
                if args.compile_only:
                    part, parts = (int(v) for v in args.compile_only.split("/"))
                    for i, (kernel, config, call) in enumerate(candidates):
                        if i % parts == part:
                            try:
                                call(w)
                            except Exception:  # noqa: BLE001 - reported by the timed run
                                pass
                    continue
                for kernel, config, call in candidates:
                    try:
                        out = call(w)
                        err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                        if not err < 2e-2:
                            raise AssertionError(f"relative error {err:.3g}")
                        us = graphed_us(call, copies)
                    except Exception as e:  # noqa: BLE001 - out of registers or shared memory: not a candidate
                        print(f"  skip {name} {method} M={m} {kernel} {config}: {type(e).__name__}: {str(e)[:100]}",
                              flush=True)
                        continue
                    record(name, method, m, kernel, dataclasses.asdict(config) if config else None, us, w.nbytes)
                mine = [r for r in rows if (r["shape"], r["method"], r["m"]) == (name, method, m)]
                best = {}
                for r in mine:
                    if r["kernel"] not in best or r["us"] < best[r["kernel"]]["us"]:
                        best[r["kernel"]] = r
                print(f"{name:8s} {method} M={m:5d} bf16 {bf16_us[m]:8.1f} us | " + " | ".join(
                    f"{kn} {r['us']:7.1f} ({bf16_us[m] / r['us']:.2f}x, {r['of_copy']:.0%}) {r['config'] or ''}"
                    for kn, r in best.items()), flush=True)
            del copies, w, ref_w, tg
            gc.collect()
            torch.cuda.empty_cache()
        del w16
        if args.compile_only:
            return
        args.out.write_text(json.dumps({"provenance": provenance(), "copy_GBps": copy, "rows": rows}, indent=1))
        if args.write_table:  # after each shape, so that a run cut short keeps what it measured
            path = write_table(rows, props.name)
            print(f"wrote {path}")
    print(f"wrote {args.out}")


def write_table(rows: list[dict], device_name: str) -> Path:
    """The fastest kernel of wint_linear's three for each (bits, N, K, M) measured, as this card's table."""
    shapes = {name: (n, k) for name, n, k in SHAPES}
    best = {}
    for r in rows:
        if r["kernel"] in wl.KERNELS and r["method"] != "bf16":
            key = (r["method"], r["shape"], r["m"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    choices = [{"bits": METHODS[method].bits, "n": shapes[shape][0], "k": shapes[shape][1], "m": m,
                "kernel": r["kernel"], "config": r["config"], "us": round(r["us"], 2)}
               for (method, shape, m), r in sorted(best.items())]
    from pdlab.provenance import provenance

    path = wl.table_path(device_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():  # keep what an earlier run measured at the (bits, N, K, M) this one did not
        measured = {(c["bits"], c["n"], c["k"], c["m"]) for c in choices}
        earlier = json.loads(path.read_text())["choices"]
        choices = sorted([c for c in earlier if (c["bits"], c["n"], c["k"], c["m"]) not in measured] + choices,
                         key=lambda c: (c["bits"], c["n"], c["k"], c["m"]))
    path.write_text(json.dumps({"device": device_name, "measured_by": "benchmarks/wint_kernels.py",
                                "provenance": provenance(), "choices": choices}, indent=1))
    return path


if __name__ == "__main__":
    main()
