"""`python -m pdlab.profiler`: time the real engine's steps on this machine, for the simulator's `ProfileCost`.

    python -m pdlab.profiler --model llama3-8b --device cuda --out data/profiles/llama3-8b-h100.csv

Two kinds of rows, each the median of `--repeats` timed steps after one untimed one:
- prefill: one request's whole prompt of `num_tokens` tokens in one step;
- decode: `num_seqs` requests each with `context_tokens` of context, one token each.
Columns: phase, num_seqs, num_tokens, context_tokens, step_ms (see
`pdlab.sim.profile_cost.PROFILE_COLUMNS`). The engine is the one `pdlab.run`
serves with (same model loader, scheduler and runner), so the table
calibrates the simulator to this GPU and this engine version.

Under CUDA MPS, as an instance that shares its GPU runs (a GPU and the right to start the daemon needed):

    python -m pdlab.profiler --model llama3-8b --device cuda --sm-percentage 40 --beside matmul:60 ...

`--sm-percentage N` limits this process to N% of the SMs (what an instance's flag of the same name does)
and `--beside KIND:P` keeps a second process busy on the same GPU, limited to P%, for the whole profile:
`matmul` (bf16 8192^3 products: compute-bound, as a prefill), `copy` (1 GiB device-to-device copies:
bandwidth-bound, as a decode), or the engine itself with the same model, as the other instance of a one-GPU
pair works: `prefill` (2048-token prompts back to back) or `decode` (32 requests decoding at 1-2k tokens of
context, with the pauses between steps a real instance has). The steps are timed while the other partition
works.

Time-sliced, as two plain processes share a GPU without MPS (`--sharing time`; P must be 100, there is no
SM limit to set):

    python -m pdlab.profiler --model llama3-8b --device cuda --sharing time --beside matmul:100 ...
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from pdlab.errors import ConfigError
from pdlab.sim.profile_cost import PROFILE_COLUMNS


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _prompt(vocab: int, n: int, salt: int) -> list[int]:
    """n token ids, different for each salt: nothing one request computes is reused by another."""
    return [100 + (salt * 7919 + i * 31) % (vocab - 100) for i in range(n)]


def profile_engine(model: str, device: str, dtype: str, prefill_tokens: list[int], decode_batches: list[int],
                   decode_contexts: list[int], repeats: int, block_size: int = 16, seed: int = 0,
                   quantization: str | None = None, tensor_parallel_size: int = 1,
                   num_threads: int | None = None, checks: list[dict] | None = None, recheck: int = 3) -> list[dict]:
    """The profile rows (see the module docstring). `num_threads`: CPU threads to time with (set it to
    what the served instance gets, e.g. `pdlab.cluster.deployment.cpu_threads`); None keeps torch's.
    With a `checks` list, `recheck` of the rows (`recheck_rows`) are timed again after all the others and
    appended to it with `again_ms` (`disagreements` compares the two)."""
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
        return _prompt(vocab, n, salt)

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

    def time_prefill(n: int, salt: int) -> float:
        times = []
        for r in range(repeats + 1):
            engine.add_request(prompt(n, salt + r), SamplingParams(max_tokens=1, ignore_eos=True))
            times.append(timed_step())
        return statistics.median(times[1:]) * 1e3

    def time_decode(batch: int, context: int) -> float:
        ids = [f"profile-{context}-{batch}-{i}" for i in range(batch)]
        for i, rid in enumerate(ids):
            engine.add_request(prompt(context, i), SamplingParams(max_tokens=decode_tokens(batch, context),
                                                                  ignore_eos=True), rid)
        while any(r.phase == "prefill" for r in engine.scheduler.requests.values()):
            engine.step()  # the prompts, untimed
        times = []
        for _ in range(repeats + 1):
            running = [r for r in engine.scheduler.requests.values() if not r.is_finished]
            if len(running) != batch or engine.scheduler.num_running != batch:
                raise RuntimeError(f"decode profile at batch {batch}, context {context}: {len(running)} "
                                   f"requests would decode, not {batch} (too few KV blocks or steps?)")
            times.append(timed_step())
        for rid in ids:
            engine.abort(rid)
        return statistics.median(times[1:]) * 1e3

    def measure(row: dict, salt: int = 0) -> float:
        if row["phase"] == "prefill":
            return time_prefill(row["num_tokens"], salt)  # another salt, other prompts: nothing is reused
        return time_decode(row["num_seqs"], row["context_tokens"])

    rows = [{"phase": "prefill", "num_seqs": 1, "num_tokens": n, "context_tokens": n} for n in prefill_tokens]
    rows += [{"phase": "decode", "num_seqs": b, "num_tokens": b, "context_tokens": c}
             for c in decode_contexts for b in decode_batches]
    for row in rows:
        row["step_ms"] = measure(row)
    if checks is not None:  # a few rows again, at the end: the table holds only if they agree
        for row in recheck_rows(rows, recheck):
            checks.append({**row, "again_ms": measure(row, salt=10_000)})
    engine.close()
    return rows


RECHECK_TOLERANCE = 0.05


def recheck_rows(rows: list[dict], n: int) -> list[dict]:
    """Up to n rows spread over the table: the longest prefill, then the smallest and the largest decode."""
    prefill = [r for r in rows if r["phase"] == "prefill"]
    decode = sorted((r for r in rows if r["phase"] == "decode"), key=lambda r: (r["num_seqs"], r["context_tokens"]))
    picked = ([prefill[-1]] if prefill else []) + decode[:1] + decode[-1:]
    unique = [dict(r) for i, r in enumerate(picked) if r not in picked[:i]]
    return [{k: v for k, v in r.items() if k != "step_ms"} for r in unique[:n]]


def disagreements(rows: list[dict], checks: list[dict], tolerance: float = RECHECK_TOLERANCE) -> list[str]:
    """One line per re-timed row more than `tolerance` away from the table's time for it."""
    by_key = {(r["phase"], r["num_seqs"], r["num_tokens"], r["context_tokens"]): r["step_ms"] for r in rows}
    lines = []
    for c in checks:
        first = by_key[(c["phase"], c["num_seqs"], c["num_tokens"], c["context_tokens"])]
        if abs(c["again_ms"] - first) > tolerance * first:
            lines.append(f"{c['phase']} of {c['num_seqs']} x {c['context_tokens']} tokens: {first:.2f} ms in the "
                         f"table, {c['again_ms']:.2f} ms again ({c['again_ms'] / first - 1:+.0%})")
    return lines


# The other partition's work (--beside): runs until its stdin closes. `matmul` and `copy` keep the GPU busy
# without a pause; `prefill` and `decode` are the engine itself, as the other instance of a one-GPU pair runs:
# 2048-token prompts back to back, or 32 requests decoding at 1-2k tokens of context.
_LOADS = {
    "matmul": "a = torch.randn(8192, 8192, device='cuda', dtype=torch.bfloat16); b = a.clone(); step = lambda: a @ b",
    "copy": "a = torch.empty(1 << 30, dtype=torch.uint8, device='cuda'); b = a.clone(); step = lambda: b.copy_(a)",
    "prefill": "step = engine_load({model!r}, {dtype!r}, batch=1, prompt=2048, max_tokens=1)",
    "decode": "step = engine_load({model!r}, {dtype!r}, batch=32, prompt=1024, max_tokens=1023)",
}
_LOAD_LOOP = """
import select, sys, torch
from pdlab.profiler import engine_load
{setup}
print("busy", flush=True)
while not select.select([sys.stdin], [], [], 0)[0]:
    for _ in range(20):
        step()
    torch.cuda.synchronize()
"""


def engine_load(model: str, dtype: str, batch: int, prompt: int, max_tokens: int, device: str = "cuda"):
    """A step function that keeps an engine (its `engine`) of `model` serving `batch` requests of `prompt`
    tokens, each generating `max_tokens` (a new one starts as one ends)."""
    from pdlab.engine.config import EngineConfig
    from pdlab.engine.engine import LLMEngine
    from pdlab.sampling_params import SamplingParams

    max_len = prompt + max_tokens + 1
    engine = LLMEngine(EngineConfig(model=model, device=device, dtype=dtype, num_blocks=batch * -(-max_len // 16) + 8,
                                    max_num_seqs=batch, max_num_batched_tokens=2048, max_model_len=max_len))
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    added = 0

    def step() -> None:
        nonlocal added
        while len(engine.scheduler.requests) < batch:
            added += 1
            engine.add_request(_prompt(vocab, prompt, added), params)
        engine.step()

    step.engine = engine
    return step


def parse_beside(text: str) -> tuple[str, int]:
    """'matmul:60' -> ('matmul', 60); ValueError naming the problem otherwise."""
    kind, _, pct = text.partition(":")
    if kind not in _LOADS or not pct.isdigit() or not 1 <= int(pct) <= 100:
        raise ValueError(f"--beside takes KIND:PERCENT with KIND one of {', '.join(_LOADS)} and PERCENT in 1..100, "
                         f"got {text!r}")
    return kind, int(pct)


@contextmanager
def shared_gpu(sharing: str, sm_percentage: int | None, beside: tuple[str, int] | None, model: str = "",
               dtype: str = "bfloat16"):
    """This process sharing its GPU with the `beside` load: under MPS at `sm_percentage` (set before CUDA
    starts), or time-sliced (`sharing="time"`: plain processes, no SM limits)."""
    from pdlab.cluster.args import MPS_THREAD_PERCENTAGE_ENV, apply_sm_percentage
    from pdlab.cluster.mps import MpsDaemon

    with ExitStack() as stack:
        if sharing == "mps":
            os.environ.update(stack.enter_context(MpsDaemon()).env)
            apply_sm_percentage(sm_percentage)
        if beside is not None:
            kind, pct = beside
            env = {**os.environ, MPS_THREAD_PERCENTAGE_ENV: str(pct)} if sharing == "mps" else dict(os.environ)
            setup = _LOADS[kind].format(model=model, dtype=dtype)
            load = subprocess.Popen([sys.executable, "-c", _LOAD_LOOP.format(setup=setup)], env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            stack.callback(load.wait, 60)
            stack.callback(load.stdin.close)
            if load.stdout.readline().strip() != "busy":
                raise RuntimeError(f"the --beside {kind} load did not start (exit code {load.wait(60)})")
        yield


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
    parser.add_argument("--sm-percentage", type=int, default=None, help="profile under CUDA MPS at N%% of the SMs")
    parser.add_argument("--beside", default=None, metavar="KIND:P",
                        help="with a second process busy at P%% of the SMs: matmul, copy, or the engine itself "
                             "(same model) prefilling or decoding")
    parser.add_argument("--sharing", choices=("mps", "time"), default="mps",
                        help="how --beside shares the GPU: under CUDA MPS, or time-sliced (no MPS)")
    parser.add_argument("--recheck", type=int, default=3,
                        help="rows timed again at the end, which must agree within 5%% (0: none)")
    parser.add_argument("--out", type=Path, default=Path("profile.csv"))
    args = parser.parse_args(argv)
    try:
        beside = parse_beside(args.beside) if args.beside else None
    except ValueError as e:
        parser.error(str(e))
    if args.sm_percentage is not None and not 1 <= args.sm_percentage <= 100:
        parser.error(f"--sm-percentage must be in 1..100, got {args.sm_percentage}")
    if args.sharing == "time" and (args.sm_percentage is not None or (beside and beside[1] != 100)):
        parser.error("--sharing time has no SM limits: leave out --sm-percentage and give --beside KIND:100")
    checks: list[dict] = []
    with ExitStack() as stack:
        if args.sm_percentage is not None or beside is not None:
            try:
                stack.enter_context(shared_gpu(args.sharing, args.sm_percentage, beside, args.model,
                                               "bfloat16" if args.dtype == "auto" else args.dtype))
            except (ConfigError, RuntimeError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        rows = profile_engine(args.model, args.device, args.dtype, args.prefill_tokens, args.decode_batches,
                              args.decode_contexts, args.repeats, quantization=args.quantization,
                              tensor_parallel_size=args.tensor_parallel_size, checks=checks, recheck=args.recheck)
    print(f"wrote {len(rows)} rows to {write_profile(rows, args.out)}")
    bad = disagreements(rows, checks)
    if bad:
        print(f"error: {len(bad)} of {len(checks)} rows timed again differ by more than {RECHECK_TOLERANCE:.0%} "
              f"(was the device busy with something else?):\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    if checks:
        print(f"rechecked {len(checks)} rows: within {RECHECK_TOLERANCE:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
