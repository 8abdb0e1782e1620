"""`python -m pdlab.placement`: which layout of a GPU budget serves the most requests per GPU within SLO.

    python -m pdlab.placement --model ernie-4.5-300b-a47b --quantization wint4 --num-gpus 8 --tp 4,8 \
        --ttft-ms 3000 --tpot-ms 150

DistServe's search over the simulator (`pdlab.sim.search`): every
colocated layout (n mixed instances of TP t) and every disaggregated one
(x prefill instances of TP t_p, y decode instances of TP t_d) within the
budget (and, with `--one-gpu-pairs`, a prefill and a decode instance sharing
one GPU, time-sliced or under MPS with an SM split), each simulated with the
roofline cost model of its own TP degree (or `--profile`'s step times) on
the same requests, with the request rate bisected to the highest one whose
SLO attainment reaches the target, on `--jobs` processes. Prints every
layout's goodput per GPU, then the best and the runner-up.

The workload's lengths use an experiment file's syntax (`workload.prompt_len`,
e.g. `--prompt-len '{kind: lognormal, median_tokens: 512, sigma: 0.8}'`);
arrivals are Poisson (or gamma with `--arrival-cv`), or the trace's own gaps
with `--trace`, rescaled to each trial rate. Models: every preset, the
simulator-only mixture-of-experts models (`pdlab.sim.models`), or a dense
Hugging Face directory.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from pdlab.errors import ConfigError, PdlabError

DEFAULT_PROMPT_LEN = "{kind: lognormal, median_tokens: 512, sigma: 0.8, max_tokens: 4096}"
DEFAULT_OUTPUT_LEN = "{kind: lognormal, median_tokens: 128, sigma: 0.8, max_tokens: 1024}"
QUANTIZATIONS = {"none": None, "wint8": "wint8", "wint4": "wint4"}  # the flag's values -> pdlab.policy.sizing's keys
FLAGS = {"num_requests": "--num-requests", "arrival": "--arrival-cv", "prompt_len": "--prompt-len",
         "output_len": "--output-len", "trace": "--trace"}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _ints(flag: str, text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ConfigError(f"{flag}: expected comma-separated positive integers, got {text!r}")
    return values


def _length(flag: str, text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{flag}: not a YAML mapping: {e}".splitlines()[0]) from None


def build_workload(args: argparse.Namespace, vocab_size: int, max_model_len: int):
    """The requests, at a mean rate of 1 req/s (each trial rescales them)."""
    from pdlab.experiment import WorkloadSection
    from pdlab.workload import make_workload
    from pdlab.yaml_config import describe_error

    if args.trace is not None:
        arrival = {"kind": "trace", "rate_rps": 1.0}
    elif args.arrival_cv == 1.0:
        arrival = {"kind": "poisson", "rate_rps": 1.0}
    else:
        arrival = {"kind": "gamma", "rate_rps": 1.0, "cv": args.arrival_cv}
    trace_len = "{kind: trace}" if args.trace is not None else None
    data = {"num_requests": args.num_requests, "arrival": arrival, "trace": args.trace,
            "prompt_len": _length("--prompt-len", args.prompt_len or trace_len or DEFAULT_PROMPT_LEN),
            "output_len": _length("--output-len", args.output_len or trace_len or DEFAULT_OUTPUT_LEN)}
    try:
        section = WorkloadSection.model_validate(data)
    except ValidationError as e:
        messages = []
        for err in e.errors():
            field, _, message = describe_error(err, WorkloadSection, "", None).removeprefix(": ").partition(": ")
            key, _, rest = field.partition(".")
            flag = FLAGS.get(key, "workload" if key == "(top level)" else key)
            messages.append(f"{flag}: {rest}: {message}" if rest else f"{flag}: {message}")
        raise ConfigError("; ".join(messages).replace("(set workload.trace)", "(give --trace)")) from None
    if section.max_request_tokens is not None and section.max_request_tokens > max_model_len:
        raise ConfigError(f"requests can need up to {section.max_request_tokens} prompt + output tokens, more than "
                          f"--max-model-len ({max_model_len})")
    return make_workload(section.to_spec(), vocab_size=vocab_size, seed=args.seed)


def build_problem(args: argparse.Namespace):
    from pdlab.models.source import model_config
    from pdlab.policy import sizing
    from pdlab.sim import GPUS, LINKS
    from pdlab.sim.models import sim_model
    from pdlab.sim.cost import overhead_seconds, parse_overhead_ms
    from pdlab.sim.search import PlacementProblem

    if args.num_gpus < 1:
        raise ConfigError(f"--num-gpus: must be >= 1, got {args.num_gpus}")
    for flag, value in (("--ttft-ms", args.ttft_ms), ("--tpot-ms", args.tpot_ms)):
        if not value > 0:
            raise ConfigError(f"{flag}: must be > 0, got {value:g}")
    if not 0 < args.attainment <= 1:
        raise ConfigError(f"--attainment: must be in (0, 1], got {args.attainment:g}")
    model = sim_model(args.model, model_config)
    max_model_len = sizing.max_model_len(model.config.max_position_embeddings, args.max_model_len)
    try:
        scheduler = sizing.scheduler_config(args.max_num_seqs, args.max_num_batched_tokens, True, max_model_len)
    except ValueError as e:
        raise ConfigError(f"scheduler: {e}") from None
    requests = build_workload(args, model.config.vocab_size, max_model_len)
    profile = None
    if args.profile is not None:
        from pdlab.sim.profile_cost import ProfileCost

        try:
            profile = ProfileCost.from_csv(args.profile)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"--profile {args.profile}: {e}") from None
    try:
        overhead_s = overhead_seconds(parse_overhead_ms(args.step_overhead_ms))
    except ValueError as e:
        raise ConfigError(f"--step-overhead-ms: {e}") from None
    if args.mps_capacity < 1:
        raise ConfigError("--mps-capacity must be >= 1")
    return PlacementProblem(model.config, requests, args.ttft_ms / 1e3, args.tpot_ms / 1e3, args.attainment,
                            gpu=GPUS[args.gpu], scheduler=scheduler, block_size=args.block_size,
                            link=LINKS[args.link], moe=model.moe,
                            weight_bits=sizing.WEIGHT_BITS[QUANTIZATIONS[args.quantization]],
                            routing=args.routing, profile=profile, step_overhead_s=overhead_s,
                            mps_capacity=args.mps_capacity)


def search_candidates(args: argparse.Namespace, problem):
    from pdlab.sim.search import candidates, shared_gpu_pairs

    tps = _ints("--tp", args.tp)
    prefill_tps, decode_tps = _ints("--prefill-tp", args.prefill_tp), _ints("--decode-tp", args.decode_tp)
    layouts = {x.strip() for x in args.layouts.split(",") if x.strip()}
    if not layouts or layouts - {"colocated", "disaggregated"}:
        raise ConfigError(f"--layouts: expected colocated, disaggregated or both, got {args.layouts!r}")
    for flag, choices in (("--tp", tps), ("--prefill-tp", prefill_tps), ("--decode-tp", decode_tps)):
        for tp in choices or ():
            try:
                problem.cost(tp)
            except ValueError as e:
                raise ConfigError(f"{flag} {tp}: {e}") from None
    found = candidates(args.num_gpus, tps, "colocated" in layouts, "disaggregated" in layouts, prefill_tps,
                       decode_tps)
    try:
        found += shared_gpu_pairs([x for x in args.one_gpu_pairs.split(",") if x.strip()])
    except ValueError as e:
        raise ConfigError(f"--one-gpu-pairs: {e}") from None
    if not found:
        raise ConfigError(f"no layout of the TP degrees asked for fits --num-gpus {args.num_gpus}")
    return found


def format_results(results) -> str:
    name_width = max(len("layout"), *(len(r.candidate.name) for r in results))
    lines = [f"{'layout':<{name_width}}  GPUs  goodput rps  per-GPU rps  attainment"]
    for r in results:
        note = f"  ({r.infeasible})" if r.infeasible else ""
        lines.append(f"{r.candidate.name:<{name_width}}  {r.candidate.num_gpus:>4}  {r.goodput_rps:>11.3f}  "
                     f"{r.per_gpu_goodput_rps:>11.3f}  {r.attainment:>10.1%}{note}")
    lines.append("")
    for label, r in zip(("best", "runner-up"), results[:2]):
        gpus = f"{r.candidate.num_gpus} GPU{'s' if r.candidate.num_gpus > 1 else ''}"
        lines.append(f"{label}: {r.candidate.name}, {r.per_gpu_goodput_rps:.3f} req/s per GPU "
                     f"({r.goodput_rps:.3f} req/s on {gpus})")
    if len(results) < 2:
        lines.append("runner-up: none (only one layout was tried)")
    return "\n".join(lines)


def write_csv(results, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["layout", "mode", "num_gpus", "num_instances", "tp", "num_prefill", "prefill_tp",
                         "num_decode", "decode_tp", "gpu_sharing", "prefill_sm_pct", "decode_sm_pct", "goodput_rps",
                         "per_gpu_goodput_rps", "attainment", "infeasible"])
        for r in results:
            c = r.candidate
            writer.writerow([c.name, c.mode, c.num_gpus, c.num_instances, c.tp, c.num_prefill, c.prefill_tp,
                             c.num_decode, c.decode_tp, c.gpu_sharing, *c.sm_percentage, r.goodput_rps,
                             r.per_gpu_goodput_rps, r.attainment, r.infeasible or ""])


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m pdlab.placement", description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--model", default="llama3-8b", help="a preset, a simulator-only model (ernie-4.5-300b-a47b) or a directory")
    add("--quantization", choices=sorted(QUANTIZATIONS), default="none", help="weight-only quantization of the linears")
    add("--gpu", default="h100", choices=["h100"])
    add("--num-gpus", type=int, default=8, help="the GPU budget")
    add("--tp", default="1,2,4,8", help="TP degrees to try (colocated, and each phase unless given below)")
    add("--prefill-tp", help="TP degrees of prefill instances (default: --tp)")
    add("--decode-tp", help="TP degrees of decode instances (default: --tp)")
    add("--layouts", default="colocated,disaggregated", help="colocated, disaggregated, or both")
    add("--one-gpu-pairs", default="", metavar="SPEC,SPEC",
        help="also try a prefill and a decode instance on ONE GPU: time (time-sliced) or mps:P/D (SM percent of "
             "prefill and decode), e.g. time,mps:100/100,mps:70/100,mps:60/40")
    add("--profile", type=Path, help="step times of TP-1 instances from this table (python -m pdlab.profiler)")
    add("--step-overhead-ms", default="0", help="what a served instance adds to every step: ms (3.6), or batch:ms "
        "pairs (1:0,16:3.2) as `python -m pdlab.fidelity --measure-overhead` prints them")
    add("--mps-capacity", type=float, default=1.0, help="GPUs' worth of work concurrent steps under MPS do together")
    add("--link", default="nvlink", choices=["nvlink", "pcie", "rdma", "ideal"], help="the KV link of PD layouts")
    add("--routing", default="innode", choices=["innode", "splitwise"], help="who picks the instances")
    add("--ttft-ms", type=float, required=True, help="TTFT SLO")
    add("--tpot-ms", type=float, required=True, help="TPOT SLO")
    add("--attainment", type=float, default=0.9, help="share of requests that must meet both SLOs")
    add("--num-requests", type=int, default=1000,
        help="requests per trial; with a few hundred, start-up transients inflate the goodput of fast layouts")
    add("--prompt-len", help=f"an experiment file's length mapping (default: {DEFAULT_PROMPT_LEN}; "
                             "with --trace: {kind: trace})")
    add("--output-len", help=f"as --prompt-len (default: {DEFAULT_OUTPUT_LEN})")
    add("--arrival-cv", type=float, default=1.0, help="coefficient of variation of the gaps (1: Poisson)")
    add("--trace", type=Path, help="a trace CSV (Azure or Vidur layout): its arrival gaps, and lengths by default")
    add("--max-num-seqs", type=int, default=128)
    add("--max-num-batched-tokens", type=int, default=8192)
    add("--max-model-len", type=int, help="default: the model's context, at most 8192 (as the engine's)")
    add("--block-size", type=int, default=16)
    add("--seed", type=int, default=0)
    add("--jobs", type=int, default=os.cpu_count() or 1, help="processes to search on (default: one per core)")
    add("--out", type=Path, help="also write the results as CSV here")
    add("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        from tqdm import tqdm

        from pdlab.sim.search import evaluate, rank

        if args.jobs < 1:
            raise ConfigError(f"--jobs: must be >= 1, got {args.jobs}")
        problem = build_problem(args)
        found = search_candidates(args, problem)
        with tqdm(total=len(found), desc="layouts", unit="layout", disable=args.no_progress, file=sys.stderr) as bar:
            results = rank(evaluate(problem, found, args.jobs, on_result=lambda _: bar.update()))
    except PdlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.model} ({args.quantization}) on up to {args.num_gpus} x {args.gpu}, "
          f"{len(problem.requests)} requests, SLO TTFT {args.ttft_ms:g} ms / TPOT {args.tpot_ms:g} ms for {args.attainment:.0%} of requests\n")
    print(format_results(results))
    if args.out is not None:
        write_csv(results, args.out)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
