"""Replay the real runs of a result in the simulator and write how far apart they are (`fidelity.csv`).

    python -m pdlab.fidelity data/results/one_gpu_conversation \
        --profile data/profiles/llama3-8b_bf16_tp1_h100.csv --step-overhead-ms 1:0,16:3.2 --mps-capacity 1.2

replays every real run of a committed result in the simulator (its exact request list, with those settings,
on as many GPUs as the machine had) and writes `fidelity.csv` beside it: the errors of
`pdlab.metrics.fidelity.fidelity_table`.

    python -m pdlab.fidelity data/results/one_gpu_conversation --profile PROFILE --measure-overhead colocated@8

prints what a served instance added to each decode step of that real run beyond the profile's step, per
batch size (`pdlab.metrics.served`), as the `--step-overhead-ms` table to replay with.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pdlab.metrics.fidelity import fidelity_table, pairs_from_result, run_label
from pdlab.metrics.records import RequestRecord
from pdlab.sim.cost import format_overhead_ms, overhead_seconds, parse_overhead_ms


def replay_pairs(result, **settings) -> dict[str, tuple[list[RequestRecord], list[RequestRecord]]]:
    """(real, sim) record pairs for every real run of `result` (e.g. a GPU run under data/results/): the twin
    recorded beside it when the run said `backend: both`, else the run's request list replayed in the
    simulator now, with the run's settings, at the same rate, on as many GPUs as the machine that measured it
    had (from its provenance). `settings` replace the runs' own simulator settings, e.g.
    `profile=PATH, step_overhead_ms=3.6, mps_capacity=1.2` (fields of `pdlab.experiment.RunSection`)."""
    from pdlab.run import run_sim

    pairs = pairs_from_result(result)
    exp = result.experiment
    num_gpus = len(result.provenance.get("device", {}).get("gpus") or []) or None
    settings = {"num_gpus": num_gpus, **{k: v for k, v in settings.items() if v is not None}}
    for run in result.runs.values():
        label = run_label(run)
        if run.backend != "real" or label in pairs:
            continue
        replayed = run.run.model_copy(update=settings)
        sim = run_sim(exp if run.rate_rps is None else exp.at_rate(run.rate_rps), replayed, progress=False).records
        real_requests = sorted((r.request_id, round(r.arrival_s, 6), r.num_prompt_tokens) for r in run.records)
        sim_requests = sorted((r.request_id, round(r.arrival_s, 6), r.num_prompt_tokens) for r in sim)
        if real_requests != sim_requests:
            raise ValueError(f"{label}: the simulator's request list differs from the recorded one")
        pairs[label] = (run.records, sim)
    return pairs


REPLAY_SETTINGS = ("profile", "step_overhead_ms", "mps_capacity")  # what write_fidelity records beside the errors


def write_fidelity(out_dir: str | Path, **settings) -> Path:
    """Replay the real runs of the result in `out_dir` (`replay_pairs` with `settings`) and write their errors
    to fidelity.csv, with the settings (REPLAY_SETTINGS) in columns of their own."""
    from pdlab.run import load_result

    result = load_result(out_dir)
    slo = result.experiment.slo
    table = fidelity_table(replay_pairs(result, **settings), slo_ttft_s=slo.ttft_s, slo_tpot_s=slo.tpot_s)
    for i, name in enumerate(REPLAY_SETTINGS, start=1):
        value = settings.get(name)
        if value is not None and name == "profile":
            value = Path(value).as_posix()
        elif value is not None and name == "step_overhead_ms":
            value = format_overhead_ms(value)
        table.insert(i, name, "" if value is None else value)
    path = Path(out_dir) / "fidelity.csv"
    table.to_csv(path, index=False, float_format="%.6g")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdlab.fidelity", description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="result folders (data/results/NAME) with records and provenance")
    parser.add_argument("--profile", help="the profile table to replay with (default: each run's own)")
    parser.add_argument("--step-overhead-ms", default=None,
                        help="what a served instance adds to each engine step: ms (3.6) or batch:ms pairs (1:0,16:3.2) "
                             "(see pdlab.sim.cost.ServedCost)")
    parser.add_argument("--measure-overhead", metavar="RUN",
                        help="print the served overhead of the real run RUN (e.g. colocated@8) against --profile "
                             "as a --step-overhead-ms table, and write nothing")
    parser.add_argument("--mps-capacity", type=float, default=None,
                        help="how many GPUs' worth of work steps under MPS do together (see pdlab.sim.gpus.MpsGpu)")
    args = parser.parse_args(argv)
    try:
        overhead = None if args.step_overhead_ms is None else parse_overhead_ms(args.step_overhead_ms)
        if overhead is not None:
            overhead_seconds(overhead)
    except ValueError as e:
        parser.error(f"--step-overhead-ms: {e}")
    if args.measure_overhead is not None:
        return measure_overhead(parser, args.results, args.measure_overhead, args.profile)
    for out_dir in args.results:
        path = write_fidelity(out_dir, profile=args.profile, step_overhead_ms=overhead,
                              mps_capacity=args.mps_capacity)
        print(f"wrote {path}")
    return 0


def measure_overhead(parser: argparse.ArgumentParser, results: list[str], run: str, profile: str | None) -> int:
    from pdlab.metrics.served import served_overhead_ms
    from pdlab.run import load_result
    from pdlab.sim.profile_cost import ProfileCost

    if profile is None:
        parser.error("--measure-overhead needs --profile: the engine's own steps to subtract")
    cost = ProfileCost.from_csv(profile)
    for out_dir in results:
        runs = {run_label(r): r for r in load_result(out_dir).runs.values() if r.backend == "real"}
        if run not in runs:
            parser.error(f"{out_dir} has no real run {run!r}; it has {', '.join(sorted(runs)) or 'none'}")
        table = served_overhead_ms(runs[run].records, cost.decode_s)
        print(f"{out_dir} {run}: --step-overhead-ms {format_overhead_ms(table) if table else '(too few quiet gaps)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
