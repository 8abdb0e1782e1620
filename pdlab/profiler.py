"""`python -m pdlab.profiler`: time the real engine's steps on this machine, for the simulator's `ProfileCost`.

    python -m pdlab.profiler --model llama3-8b --device cuda --out data/profiles/llama3-8b-h100.csv

Two kinds of rows, each the median of `--repeats` timed steps after one untimed one:
- prefill: one request's whole prompt of `num_tokens` tokens in one step;
- decode: `num_seqs` requests each with `context_tokens` of context, one token each.
Columns: phase, num_seqs, num_tokens, context_tokens, step_ms (see
`pdlab.sim.profile_cost.PROFILE_COLUMNS`). The engine is the one `pdlab.run`
serves with (same model loader, scheduler and runner), so the table
calibrates the simulator to this GPU and this engine version.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

from pdlab.sim.profile_cost import PROFILE_COLUMNS


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def profile_engine(model: str, device: str, dtype: str, prefill_tokens: list[int], decode_batches: list[int],
                   decode_contexts: list[int], repeats: int, block_size: int = 16, seed: int = 0,
                   quantization: str | None = None, tensor_parallel_size: int = 1,
                   num_threads: int | None = None) -> list[dict]:
    """The profile rows (see the module docstring). `num_threads`: CPU threads to time with (set it to
    what the served instance gets, e.g. `pdlab.cluster.deployment.cpu_threads`); None keeps torch's."""
    import torch

    if num_threads is not None:
        torch.set_num_threads(num_threads)
    from pdlab.engine.config import EngineConfig
    from pdlab.engine.engine import LLMEngine
    from pdlab.sampling_params import SamplingParams

    budget = max(max(prefill_tokens), max(decode_batches))  # max_num_batched_tokens

    def decode_tokens(batch: int, context: int) -> int:
        """Tokens a decode-row request gets: its timed steps, plus one per step of the others' prefill
        (the first prompts decode beside the later ones' chunks; they must still run when timing starts)."""
        return repeats + 3 + -(-batch * context // budget)

    max_context = max([*prefill_tokens, *(c + decode_tokens(max(decode_batches), c) for c in decode_contexts)]) + 1
    need_blocks = max(-(-(max(prefill_tokens) + 1) // block_size), *(
        b * -(-(c + decode_tokens(b, c)) // block_size) for b in decode_batches for c in decode_contexts))
    engine = LLMEngine(EngineConfig(
        model=model, device=device, dtype=dtype, block_size=block_size, num_blocks=need_blocks + 8,
        max_num_seqs=max(decode_batches), max_num_batched_tokens=budget,
        max_model_len=max_context + 1, seed=seed, quantization=quantization, tensor_parallel_size=tensor_parallel_size))
    vocab = engine.model_config.vocab_size
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)

    def prompt(n: int, salt: int) -> list[int]:
        return [100 + (salt * 7919 + i * 31) % (vocab - 100) for i in range(n)]

    def timed_step() -> float:
        sync()
        start = time.perf_counter()
        engine.step()
        sync()
        return time.perf_counter() - start

    # Warm up (allocator, kernels, lazy initialisation) before anything is timed.
    for i, n in enumerate(prefill_tokens):
        engine.add_request(prompt(n, 1000 + i), SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()

    rows = []
    for n in prefill_tokens:
        times = []
        for r in range(repeats + 1):
            engine.add_request(prompt(n, r), SamplingParams(max_tokens=1, ignore_eos=True))
            times.append(timed_step())
        rows.append({"phase": "prefill", "num_seqs": 1, "num_tokens": n, "context_tokens": n,
                     "step_ms": statistics.median(times[1:]) * 1e3})
    for context in decode_contexts:
        for batch in decode_batches:
            ids = [f"profile-{context}-{batch}-{i}" for i in range(batch)]
            for i, rid in enumerate(ids):
                params = SamplingParams(max_tokens=decode_tokens(batch, context), ignore_eos=True)
                engine.add_request(prompt(context, i), params, rid)
            while any(r.phase == "prefill" for r in engine.scheduler.requests.values()):
                engine.step()  # the prompts, untimed
            times = []
            for _ in range(repeats + 1):
                running = [r for r in engine.scheduler.requests.values() if not r.is_finished]
                if len(running) != batch or engine.scheduler.num_running != batch:
                    raise RuntimeError(f"decode profile at batch {batch}, context {context}: {len(running)} "
                                       f"requests would decode, not {batch} (too few KV blocks or steps?)")
                times.append(timed_step())
            rows.append({"phase": "decode", "num_seqs": batch, "num_tokens": batch, "context_tokens": context,
                         "step_ms": statistics.median(times[1:]) * 1e3})
            for rid in ids:
                engine.abort(rid)
    engine.close()
    return rows


def write_profile(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PROFILE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdlab.profiler", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help="a preset, a Hugging Face directory or a GGUF file")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--prefill-tokens", type=_ints, default=_ints("16,64,128,256,512,1024,2048"),
                        help="comma-separated prompt lengths")
    parser.add_argument("--decode-batches", type=_ints, default=_ints("1,4,16,32,64"))
    parser.add_argument("--decode-contexts", type=_ints, default=_ints("128,512,1024"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quantization", choices=("wint8", "wint4"), default=None)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("profile.csv"))
    args = parser.parse_args(argv)
    rows = profile_engine(args.model, args.device, args.dtype, args.prefill_tokens, args.decode_batches,
                          args.decode_contexts, args.repeats, quantization=args.quantization,
                          tensor_parallel_size=args.tensor_parallel_size)
    print(f"wrote {len(rows)} rows to {write_profile(rows, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
