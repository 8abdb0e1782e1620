"""Decode-step and prefill speed of the engine on one GPU, against the hardware measured in the same run.

    python benchmarks/engine_speed.py --model llama3-8b --out data/bench/engine_speed.json

Baselines measured here, on the same card, in the same process:
- HBM floor of a decode step: the bytes a step must read (weights without the
  embedding table, plus the batch's KV) over the bandwidth of a large
  device-to-device copy (read + write counted, as DESIGN.md does);
- bf16 matmul peak (8192^3) for prefill MFU;
- Hugging Face transformers `generate` on the same shape, batch 1 (`--hf`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def decode_steps(engine: LLMEngine, batch: int, context: int, steps: int = 20) -> float:
    """Median wall time of a decode step with `batch` requests at `context` tokens."""
    gen = torch.Generator().manual_seed(batch)
    for i in range(batch):
        prompt = torch.randint(100, 30000, (context,), generator=gen).tolist()
        engine.add_request(prompt, SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True), f"d{batch}-{i}")
    while any(r.num_output_tokens == 0 for r in engine.scheduler.requests.values()):
        engine.step()  # prefill everything first
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    for rid in list(engine.scheduler.requests):
        engine.abort(rid)
    return statistics.median(times[2:])


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batches", default="1,8,32,64,128")
    parser.add_argument("--prefill", default="512,2048,8192")
    parser.add_argument("--hf", action="store_true", help="also time transformers generate at batch 1")
    parser.add_argument("--out", type=Path, default=Path("data/bench/engine_speed.json"))
    args = parser.parse_args()
    from pdlab.provenance import provenance

    copy_Bps, peak_flops = copy_bandwidth_Bps(), matmul_flops()
    torch.cuda.empty_cache()  # the engine sizes its KV cache from the memory free now
    batches = [int(b) for b in args.batches.split(",")]
    engine = LLMEngine(EngineConfig(model=args.model, dtype="bfloat16", device="cuda", max_num_seqs=max(batches),
                                    max_num_batched_tokens=8192, max_model_len=8448, gpu_memory_utilization=0.7))
    c = engine.model_config
    weight_bytes = (c.num_params() - c.vocab_size * c.hidden_size * (0 if c.tie_word_embeddings else 1)) * 2
    kv_bytes_per_token = c.kv_bytes_per_token(2)
    report = {"provenance": provenance(), "model": args.model, "copy_GBps": copy_Bps / 1e9,
              "matmul_TFLOPs": peak_flops / 1e12, "kv_blocks": engine.block_manager.num_blocks, "decode": [], "prefill": []}
    for batch in batches:
        step_s = decode_steps(engine, batch, args.context)
        floor_s = (weight_bytes + batch * args.context * kv_bytes_per_token) / copy_Bps
        row = {"batch": batch, "context": args.context, "step_ms": step_s * 1e3, "floor_ms": floor_s * 1e3,
               "x_floor": step_s / floor_s, "tokens_per_s": batch / step_s, "floor_tokens_per_s": batch / floor_s}
        report["decode"].append(row)
        print(json.dumps(row), flush=True)
    for tokens in [int(t) for t in args.prefill.split(",")]:
        t = prefill_time(engine, tokens)
        flops = 2 * c.num_params() * tokens  # matmul FLOPs, attention excluded
        row = {"tokens": tokens, "prefill_ms": t * 1e3, "mfu": flops / t / peak_flops}
        report["prefill"].append(row)
        print(json.dumps(row), flush=True)
    del engine
    torch.cuda.empty_cache()
    if args.hf:
        report["hf_generate_bs1"] = hf_generate_bs1(args.model, 512, 32)
        print(json.dumps(report["hf_generate_bs1"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
