"""The Triton paged-attention kernels against the PyTorch reference path, on llama3-8b's attention shape.

    python benchmarks/attention_kernels.py --out data/bench/attention_kernels.json

One layer's attention: 32 query heads, 8 KV heads, head_dim 128, block size 16,
bf16, blocks placed at random in the cache. Baselines measured here, on the
same card, in the same run:
- decode (one query per sequence, batch 1..128, context 1k): the kernel's
  bandwidth (the K and V bytes it must read, plus q and out) against a large
  device-to-device copy (read + write counted, as docs/facts.md and
  benchmarks/engine_speed.py count it); and the torch path (gather + SDPA);
- prefill (one whole prompt of 512 / 2k / 8k tokens, and the last 512 tokens
  of each as a chunk after cached positions): TFLOP/s of the causal attention
  against a bf16 8192^3 matmul, and the torch path (per-sequence SDPA).
Times are medians of triton.testing.do_bench (CUDA events, L2 flushed
between runs; "eager", with Python launch overhead) and, for decode, of
do_bench_cudagraph (replayed in a CUDA graph, as the engine will run decode
steps; reads rotate over copies of the blocks so they come from HBM). The
decode bandwidth uses the graph time. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton.testing  # noqa: E402

from gpu_timing import copy_bandwidth_Bps, median_ms  # noqa: E402  (this folder: the script's)
from pdlab.models.attention import decode_torch, prefill_torch  # noqa: E402
from pdlab.models.kernels import paged_attention as kernels  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16  # llama3-8b
DTYPE = torch.bfloat16
ROTATE_BYTES = 256 << 20  # more than an H100/H200's L2 (50-60 MB)


def matmul_flops() -> float:
    n = 8192
    a = torch.randn(n, n, dtype=DTYPE, device="cuda")
    b = torch.randn(n, n, dtype=DTYPE, device="cuda")
    ms = median_ms(lambda: a @ b)
    return 2 * n**3 / (ms * 1e-3)


def paged_cache(num_tokens: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """(k_cache, v_cache, block ids per sequence): random contents, each sequence's blocks scattered."""
    need = [-(-n // BLOCK_SIZE) for n in num_tokens]
    num_blocks = sum(need) + 64
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k = torch.randn(shape, dtype=DTYPE, device="cuda", generator=gen)
    v = torch.randn(shape, dtype=DTYPE, device="cuda", generator=gen)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).tolist()
    ids, start = [], 0
    for n in need:
        ids.append(perm[start: start + n])
        start += n
    return k, v, ids


def graph_median_ms(fn) -> float | None:
    """Median time of fn replayed in a CUDA graph: no launch overhead, as the engine's decode steps will run."""
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
    except Exception as e:  # a path that cannot be captured is reported, not fatal
        print(f"  (CUDA graph timing failed: {type(e).__name__}: {e})", flush=True)
        return None


def decode_row(batch: int, context: int, copy_Bps: float, gen: torch.Generator) -> dict:
    # Graph replays are back to back with no L2 flush between them: successive calls read different
    # copies of the batch's blocks, so that together they overflow L2 and each call reads from HBM.
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
    copies = max(1, -(-ROTATE_BYTES // kv_bytes))
    k, v, ids = paged_cache([context] * batch * copies, gen)
    tables = [torch.tensor(ids[c * batch: (c + 1) * batch], dtype=torch.int32, device="cuda") for c in range(copies)]
    tables64 = [t.long() for t in tables]
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    seq_lens64 = seq_lens.long()
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    out = torch.empty_like(q)
    calls = itertools.count()

    def kernel() -> None:
        kernels.paged_decode_attention(q, k, v, tables[next(calls) % copies], seq_lens, out=out)

    def reference() -> torch.Tensor:
        return decode_torch(q, k, v, tables64[next(calls) % copies], seq_lens64)

    kernel_eager_ms, torch_ms = median_ms(kernel), median_ms(reference)
    kernel_graph_ms, torch_graph_ms = graph_median_ms(kernel), graph_median_ms(reference)
    kernels.paged_decode_attention(q, k, v, tables[0], seq_lens, out=out)
    err = (out.float() - decode_torch(q, k, v, tables64[0], seq_lens64).float()).abs().max().item()
    kernel_ms = kernel_graph_ms or kernel_eager_ms
    num_bytes = kv_bytes + 2 * q.numel() * q.element_size()  # K and V of every position, q in, out back
    kernel_Bps = num_bytes / (kernel_ms * 1e-3)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    us = lambda ms: None if ms is None else ms * 1e3  # noqa: E731
    return {"batch": batch, "context": context, "kernel_us": us(kernel_ms), "kernel_eager_us": us(kernel_eager_ms),
            "torch_us": us(torch_ms), "torch_graph_us": us(torch_graph_ms),
            "speedup_vs_torch": (torch_graph_ms or torch_ms) / kernel_ms, "kernel_GBps": kernel_Bps / 1e9,
            "of_copy_bandwidth": kernel_Bps / copy_Bps,
            "num_splits": kernels.num_decode_splits(batch, NUM_KV_HEADS, tables[0].shape[1] * BLOCK_SIZE, num_sms),
            "max_abs_err_vs_torch": err}


def prefill_row(seq_len: int, q_len: int, peak_flops: float, gen: torch.Generator) -> dict:
    """One sequence: its last q_len positions are queries (q_len == seq_len: a whole prompt)."""
    k, v, ids = paged_cache([seq_len], gen)
    table = torch.tensor(ids, dtype=torch.int32, device="cuda")
    i32 = dict(dtype=torch.int32, device="cuda")
    q_start, q_lens, seq_lens = torch.zeros(1, **i32), torch.tensor([q_len], **i32), torch.tensor([seq_len], **i32)
    q = torch.randn(q_len, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    out = torch.empty_like(q)
    kernel_ms = median_ms(lambda: kernels.paged_prefill_attention(q, k, v, table, q_start, q_lens, seq_lens, q_len,
                                                                  out=out))
    torch_ms = median_ms(lambda: prefill_torch(q, k, v, ids[0], seq_len))
    err = (out.float() - prefill_torch(q, k, v, ids[0], seq_len).float()).abs().max().item()
    # Query i sees seq_len - q_len + i + 1 keys; QK^T and PV each take 2 * D FLOPs per (query, key, head).
    pairs = q_len * (seq_len - q_len) + q_len * (q_len + 1) // 2
    flops = 4 * NUM_HEADS * HEAD_DIM * pairs
    return {"seq_len": seq_len, "q_len": q_len, "kernel_us": kernel_ms * 1e3, "torch_us": torch_ms * 1e3,
            "speedup_vs_torch": torch_ms / kernel_ms, "kernel_TFLOPs": flops / (kernel_ms * 1e-3) / 1e12,
            "of_matmul_peak": flops / (kernel_ms * 1e-3) / peak_flops, "max_abs_err_vs_torch": err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batches", default="1,8,32,64,128")
    parser.add_argument("--prefill", default="512,2048,8192")
    parser.add_argument("--chunk", type=int, default=512,
                        help="also time a chunk of this many queries after cached positions")
    parser.add_argument("--out", type=Path, default=Path("data/bench/attention_kernels.json"))
    args = parser.parse_args()
    from pdlab.provenance import provenance

    gen = torch.Generator(device="cuda").manual_seed(0)
    copy_Bps, peak_flops = copy_bandwidth_Bps(), matmul_flops()
    shape = {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE,
             "dtype": "bfloat16"}
    report = {"provenance": provenance(), "shape": shape,
              "copy_GBps": copy_Bps / 1e9, "matmul_TFLOPs": peak_flops / 1e12, "decode": [], "prefill": []}
    print(f"copy {copy_Bps / 1e9:.0f} GB/s, bf16 matmul {peak_flops / 1e12:.0f} TFLOP/s", flush=True)
    for batch in [int(b) for b in args.batches.split(",")]:
        row = decode_row(batch, args.context, copy_Bps, gen)
        report["decode"].append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    for tokens in [int(t) for t in args.prefill.split(",")]:
        for q_len in sorted({tokens, min(args.chunk, tokens)}, reverse=True):
            row = prefill_row(tokens, q_len, peak_flops, gen)
            report["prefill"].append(row)
            print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
