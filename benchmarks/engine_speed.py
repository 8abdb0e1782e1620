"""Decode-step and prefill speed of the engine on GPUs, against the hardware measured in the same run.

    python benchmarks/engine_speed.py --model llama3-8b --variants bf16,bf16-eager,wint8,wint4 --hf \
        --out data/bench/engine_speed.json

Baselines measured here, on the same card, in the same process:
- HBM floor of a decode step: the bytes a step must read (weights without the
  embedding table, at the variant's bits per weight, plus the batch's KV) over
  the bandwidth of a large device-to-device copy (read + write counted, as
  docs/facts.md does);
- bf16 matmul peak (8192^3) for prefill MFU;
- the first variant's decode steps (ratios of every other variant against it);
- for each decode step and each step that carries a prompt beside decodes (`--mixed CHUNK:DECODES,...`), its
  GPU busy time (kernel time from the profiler): the rest of its wall time is host time the GPU waited for;
- Hugging Face transformers `generate` on the same shape, batch 1 (`--hf`);
- a gpt-fast-style compiled decode step of the same shape and batches (`--compiled`,
  benchmarks/compiled_llama.py).

A variant is `bf16`, `wint8` or `wint4`, optionally `-eager` (no CUDA graphs), `-async` (async
scheduling: the next step queued before the host has this one's tokens; its decode steps only) or
`-torch` (the PyTorch attention path instead of the Triton kernels); with
`--tensor-parallel-size N` every variant runs on N GPUs.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # compiled_llama

from pdlab.engine.config import EngineConfig  # noqa: E402
from pdlab.engine.engine import LLMEngine  # noqa: E402
from pdlab.sampling_params import SamplingParams  # noqa: E402


def copy_bandwidth_Bps() -> float:
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (time.perf_counter() - t)  # read + write


def matmul_flops() -> float:
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * 10 / (time.perf_counter() - t)


def start_decoding(engine: LLMEngine, batch: int, context: int, steps: int, gen: torch.Generator, tag: str) -> None:
    """`batch` requests of `context` random prompt tokens, prefilled, each with tokens left for `steps` more."""
    # The first prompts decode beside the later ones' prefill chunks: enough tokens to outlast them.
    prefill_steps = -(-batch * context // engine.scheduler_config.max_num_batched_tokens)
    for i in range(batch):
        prompt = torch.randint(100, 30000, (context,), generator=gen).tolist()
        engine.add_request(prompt, SamplingParams(max_tokens=steps + 8 + prefill_steps, temperature=0, ignore_eos=True),
                           f"{tag}-{i}")
    while any(r.num_output_tokens == 0 for r in engine.scheduler.requests.values()):
        engine.step()  # prefill everything first


def decode_steps(engine: LLMEngine, batch: int, context: int, steps: int = 20) -> tuple[float, float | None]:
    """Wall time of a decode step with `batch` requests at `context` tokens, and its GPU busy time (median
    over 3 profiled steps; None where the profiler records nothing). The wall time is that of `steps` steps
    run back to back, divided by their number, as a served instance runs them (with async scheduling a
    step returns before its GPU work ends: timing one step at a time would hide what it overlaps)."""
    start_decoding(engine, batch, context, steps, torch.Generator().manual_seed(batch), f"d{batch}")
    for _ in range(2):
        engine.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        if engine.scheduler.num_running != batch:
            raise RuntimeError(f"batch {batch}: {engine.scheduler.num_running} requests decoding, not {batch}")
        engine.step()
    engine.drain()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / steps
    busy = median_gpu_busy_s(engine.step)
    engine.drain()
    for rid in list(engine.scheduler.requests):
        engine.abort(rid)
    return wall, busy


def gpu_busy_s(fn) -> float | None:
    """Seconds the GPU spent in kernels and copies while `fn` ran (overlaps counted once), from the profiler;
    None where it records nothing."""
    from torch.profiler import DeviceType, ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == DeviceType.CUDA)
    except Exception as e:  # noqa: BLE001 - a profiler that cannot trace here costs the figure, not the run
        print(f"profiler: {type(e).__name__}: {e}", flush=True)
        return None
    busy, end = 0.0, float("-inf")
    for a, b in spans:  # microseconds; the union of the intervals
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy / 1e6 if spans else None


def median_gpu_busy_s(step, n: int = 3) -> float | None:
    """The median of `gpu_busy_s` over n calls of `step`; None where the profiler records nothing."""
    busy = [gpu_busy_s(step) for _ in range(n)]
    return statistics.median(busy) if None not in busy else None


def mixed_step(engine: LLMEngine, chunk: int, decodes: int, context: int, steps: int = 12) -> dict:
    """A step with one whole prompt of `chunk` tokens beside `decodes` requests decoding at `context` tokens:
    its median wall time, and its GPU busy time (median over 3 profiled steps)."""
    gen = torch.Generator().manual_seed(chunk + decodes)
    start_decoding(engine, decodes, context, steps + 3, gen, f"m{chunk}-{decodes}")  # the timed and profiled steps

    def one_step() -> None:
        prompt = torch.randint(100, 30000, (chunk,), generator=gen).tolist()
        request = engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0))
        outputs = engine.step()  # the whole prompt and the decodes
        if not any(o.request_id == request.request_id and o.finished for o in outputs):
            raise RuntimeError(f"mixed step {chunk}:{decodes}: the prompt did not run whole beside the decodes "
                               f"(max_num_seqs {engine.scheduler_config.max_num_seqs}, "
                               f"budget {engine.scheduler_config.max_num_batched_tokens} tokens)")

    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        one_step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    gpu = median_gpu_busy_s(one_step)
    if engine.scheduler.num_running != decodes:
        raise RuntimeError(f"mixed step {chunk}:{decodes}: {engine.scheduler.num_running} requests decoding")
    for rid in list(engine.scheduler.requests):
        engine.abort(rid)
    wall = statistics.median(times[2:])
    return {"chunk": chunk, "decodes": decodes, "context": context, "step_ms": wall * 1e3,
            "gpu_busy_ms": gpu and gpu * 1e3, "host_beyond_gpu_ms": gpu and (wall - gpu) * 1e3}


def prefill_time(engine: LLMEngine, tokens: int) -> float:
    prompt = torch.randint(100, 30000, (tokens,)).tolist()
    times = []
    for i in range(3):
        engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0), f"p{tokens}-{i}")
        torch.cuda.synchronize()
        t = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times[1:])


def hf_generate_bs1(model: str, prompt_tokens: int, new_tokens: int) -> dict:
    import transformers

    from pdlab.models.source import resolve_model

    c = resolve_model(model).config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(100, 30000, (1, prompt_tokens), device="cuda")
    with torch.no_grad():
        hf.generate(ids, max_new_tokens=4, do_sample=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, do_sample=False)
        torch.cuda.synchronize()
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
        total = time.perf_counter() - t
    del hf
    torch.cuda.empty_cache()
    return {"ttft_ms": ttft * 1e3, "ms_per_token": (total - ttft) / (new_tokens - 1) * 1e3}


def weight_bits(variant: str) -> float:
    """Bits read per linear weight (group scales included: 4 bytes per 128 weights)."""
    return {"bf16": 16, "wint8": 8 + 32 / 128, "wint4": 4 + 32 / 128}[variant.split("-")[0]]


def run_variant(args, variant: str, copy_Bps: float, peak_flops: float, batches: list[int]) -> dict:
    quant = variant.split("-")[0]
    mixed = [tuple(int(v) for v in spec.split(":")) for spec in args.mixed.split(",") if spec]
    start = time.perf_counter()
    engine = LLMEngine(EngineConfig(  # room for a mixed step's decodes and its prompt
        model=args.model, dtype="bfloat16", device="cuda", max_num_seqs=max(batches + [d + 1 for _, d in mixed]),
        max_num_batched_tokens=8192,
        max_model_len=8448, gpu_memory_utilization=0.7, quantization=None if quant == "bf16" else quant,
        enforce_eager="eager" in variant, attention_backend="torch" if "torch" in variant else "auto",
        async_scheduling="async" in variant,
        tensor_parallel_size=args.tensor_parallel_size))
    c, tp = engine.model_config, args.tensor_parallel_size
    embed = c.vocab_size * c.hidden_size
    linear_params = c.num_params() - embed * (1 if c.tie_word_embeddings else 2)  # the quantized part
    head_bytes = 0 if c.tie_word_embeddings else embed * 2  # lm_head stays bf16 (the embedding is gathered)
    weight_bytes = (linear_params * weight_bits(variant) / 8 + head_bytes) / tp  # per GPU
    kv_bytes_per_token = c.kv_bytes_per_token(2) / tp
    result = {"variant": variant, "start_s": time.perf_counter() - start, "kv_blocks": engine.block_manager.num_blocks,
              "cuda_graphs": engine.runner.graphs is not None, "piecewise_graphs": engine.runner.mixed_graphs is not None,
              "decode": [], "mixed": [], "prefill": []}
    for batch in batches:
        step_s, busy_s = decode_steps(engine, batch, args.context)
        floor_s = (weight_bytes + batch * args.context * kv_bytes_per_token) / copy_Bps
        row = {"batch": batch, "context": args.context, "step_ms": step_s * 1e3,
               "gpu_busy_ms": busy_s and busy_s * 1e3, "floor_ms": floor_s * 1e3,
               "x_floor": step_s / floor_s, "tokens_per_s": batch / step_s, "floor_tokens_per_s": batch / floor_s,
               "share_of_floor_throughput": floor_s / step_s}
        result["decode"].append(row)
        print(variant, json.dumps(row), flush=True)
    for chunk, decodes in mixed if "async" not in variant else ():  # timed one step at a time: not async
        row = mixed_step(engine, chunk, decodes, args.context)
        result["mixed"].append(row)
        print(variant, json.dumps(row), flush=True)
    for tokens in [int(t) for t in args.prefill.split(",") if t]:
        t = prefill_time(engine, tokens)
        flops = 2 * (c.num_params() - embed) * tokens / tp  # matmul FLOPs per GPU, attention excluded
        row = {"tokens": tokens, "prefill_ms": t * 1e3, "mfu": flops / t / peak_flops}
        result["prefill"].append(row)
        print(variant, json.dumps(row), flush=True)
    engine.close()
    del engine
    gc.collect()  # the runner and its CUDA graphs hold each other: free them before the next engine sizes its cache
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batches", default="1,8,32,64,128")
    parser.add_argument("--prefill", default="512,2048,8192")
    parser.add_argument("--mixed", default="16:1,128:8,512:32,960:64",
                        help="steps of one prompt of CHUNK tokens beside DECODES decoding requests")
    parser.add_argument("--variants", default="bf16", help="comma-separated; the first is the baseline")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--hf", action="store_true", help="also time transformers generate at batch 1")
    parser.add_argument("--compiled", action="store_true",
                        help="also time a gpt-fast-style compiled decode step (benchmarks/compiled_llama.py)")
    parser.add_argument("--out", type=Path, default=Path("data/bench/engine_speed.json"))
    args = parser.parse_args()
    from pdlab.provenance import provenance

    copy_Bps, peak_flops = copy_bandwidth_Bps(), matmul_flops()
    torch.cuda.empty_cache()  # the engine sizes its KV cache from the memory free now
    batches = [int(b) for b in args.batches.split(",")]
    report = {"provenance": provenance(), "model": args.model, "tensor_parallel_size": args.tensor_parallel_size,
              "copy_GBps": copy_Bps / 1e9, "matmul_TFLOPs": peak_flops / 1e12, "variants": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for variant in args.variants.split(","):  # the file is rewritten after each, so a cut-off run keeps its rows
        report["variants"].append(run_variant(args, variant, copy_Bps, peak_flops, batches))
        base = {row["batch"]: row["step_ms"] for row in report["variants"][0]["decode"]}
        for row in report["variants"][-1]["decode"] if len(report["variants"]) > 1 else []:
            row["speedup_vs_" + report["variants"][0]["variant"]] = base[row["batch"]] / row["step_ms"]
        args.out.write_text(json.dumps(report, indent=2))
    if args.compiled:
        from compiled_llama import compiled_decode_ms

        from pdlab.models.source import resolve_model

        config = resolve_model(args.model).config
        first = {row["batch"]: row["step_ms"] for row in report["variants"][0]["decode"]}
        report["compiled"] = []
        for batch in batches:
            row = compiled_decode_ms(config, batch, args.context)
            row["pdlab_vs_compiled"] = first[batch] / row["step_ms"]  # < 1: pdlab's step is faster
            report["compiled"].append(row)
            print("compiled", json.dumps(row), flush=True)
            args.out.write_text(json.dumps(report, indent=2))
    if args.hf:
        report["hf_generate_bs1"] = hf_generate_bs1(args.model, 512, 32)
        print(json.dumps(report["hf_generate_bs1"]), flush=True)
        args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
