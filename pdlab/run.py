"""`python -m pdlab.run EXPERIMENT.yaml`: run an experiment, print its table, write its results
(`pdlab.results` says which files, and reads them back).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

from pdlab.errors import ConfigError, PdlabError
from pdlab.experiment import Experiment, RunSection, load_experiment
from pdlab.metrics.records import RequestRecord
from pdlab.results import (  # noqa: F401  (load_result, records_path, write_results: also pdlab.run's, as before)
    ExperimentResult, RunResult, format_report, load_result, records_path, summarize_run, write_results,
)
from pdlab.workload.workload import RequestSpec, make_workload


def run_real(exp: Experiment, run: RunSection, progress: bool, log_dir: Path | None = None) -> Iterator[RunResult]:
    """Serve the workload on real instance processes of the run's layout, once per rate of the sweep
    (one deployment for all of them, warmed up first with `warmup_requests` discarded requests); time it
    at the client. Yields each rate's result as soon as it is measured."""
    from pdlab.loadgen.balance import Balanced
    from pdlab.loadgen.replay import replay
    from pdlab.cluster.client import RemoteEngine
    from pdlab.cluster.deployment import Deployment
    from pdlab.models.source import resolve_model

    tokenizer = resolve_model(exp.model.name).load_tokenizer()
    tp = exp.engine.tensor_parallel_size
    deployment = Deployment(exp.model.name, run.mode, exp.instance_args(), protocol=run.transfer_protocol,
                            num_instances=run.num_instances, num_prefill=run.num_prefill, num_decode=run.num_decode,
                            tensor_parallel_size=run.tp("mixed", tp), prefill_tp=run.tp("prefill", tp),
                            decode_tp=run.tp("decode", tp), log_dir=log_dir, gpu_sharing=run.gpu_sharing,
                            sm_percentage=dict(run.sm_percentage), memory_share=dict(run.memory_share),
                            share_weights=run.share_weights, gpu_memory_utilization=exp.engine.gpu_memory_utilization,
                            progress=progress)

    def serve(at_rate: Experiment, desc: str) -> tuple[list[RequestSpec], list[RequestRecord], dict]:
        requests = build_requests(at_rate, tokenizer)
        engine = Balanced([RemoteEngine(endpoint) for endpoint in deployment.endpoints])
        try:
            records, outputs = replay(engine, requests, lambda spec: params_for(exp, spec), run.mode,
                                      progress=progress, desc=desc)
        finally:
            engine.close()
        return requests, records, outputs

    with deployment:
        if exp.warmup_requests:
            serve(exp.warmup(), f"{run.name} warm-up (discarded)")
        for rate in exp.rates:
            requests, records, outputs = serve(exp.at_rate(rate), run.name if rate is None else f"{run.name} @ {rate:g} req/s")
            texts = {spec.request_id: {"prompt": spec.prompt_text, "answer": outputs[spec.request_id].text}
                     for spec in requests if spec.prompt_text is not None}
            yield RunResult(run, records, summarize_run(exp, records), texts, "real", rate)


def run_sims(exp: Experiment, run: RunSection, progress: bool, log_dir: Path | None = None) -> Iterator[RunResult]:
    """`run_sim` at every rate of the sweep."""
    for rate in exp.rates:
        desc = run.name if rate is None else f"{run.name} @ {rate:g} req/s"
        result = run_sim(exp.at_rate(rate), run, progress, log_dir, desc=f"{desc} (simulated)")
        result.rate_rps = rate
        yield result


def run_sim(exp: Experiment, run: RunSection, progress: bool, log_dir: Path | None = None,
            desc: str | None = None) -> RunResult:
    """Serve the same request list in the SimPy model: the real scheduler, a roofline cost per step.
    `progress`: a bar of the requests simulated so far (`desc` names it)."""
    from tqdm.auto import tqdm

    from pdlab.models.source import model_config, resolve_model
    from pdlab.models.tokenizer import ByteTokenizer
    from pdlab.policy.devices import gpus_of
    from pdlab.policy import sizing
    from pdlab.sim import GPUS, LINKS, InstanceSpec, Layout, simulate
    from pdlab.sim.cost import ServedCost, overhead_seconds
    from pdlab.sim.models import SIM_MODELS, sim_model
    from pdlab.sim.profile_cost import ProfileCost

    sim = sim_model(exp.model.name, model_config)  # the dense presets, the simulator-only MoE models, or a model directory
    model = sim.config
    tokenizer = ByteTokenizer.for_config(model) if exp.model.name in SIM_MODELS \
        else resolve_model(exp.model.name).load_tokenizer()
    requests = build_requests(exp, tokenizer)
    e = exp.engine
    weight_bits = sizing.WEIGHT_BITS[exp.model.quantization]
    max_model_len = sizing.max_model_len(model.max_position_embeddings, e.max_model_len)
    try:
        scheduler = sizing.scheduler_config(e.max_num_seqs, e.max_num_batched_tokens, e.enable_chunked_prefill,
                                            max_model_len)
    except ValueError as err:
        raise PdlabError(f"engine: {err}") from None

    def instance(phase: str) -> InstanceSpec:
        """One instance of `phase` on its GPUs: its roofline cost and the KV blocks its memory leaves."""
        tp = run.tp(phase, e.tensor_parallel_size)
        try:
            cost = sim.cost(GPUS[run.gpu], tp=tp, weight_bits=weight_bits)
        except ValueError as err:
            raise PdlabError(f"run {run.name}: tensor-parallel size {tp}: {err}") from None
        num_blocks = e.num_blocks or cost.max_num_blocks(e.block_size, e.gpu_memory_utilization)
        if num_blocks * e.block_size < max_model_len:
            raise PdlabError(f"run {run.name}: {model.name}'s weights leave room for {num_blocks * e.block_size} KV "
                             f"tokens per {phase} instance of {tp} GPU(s), fewer than max_model_len "
                             f"({max_model_len}); use more GPUs per instance or quantize (model.quantization)")
        # Step times from a measured profile when the run names one (memory still from the roofline's sizes).
        field = {"mixed": "profile", "prefill": "prefill_profile", "decode": "decode_profile"}[phase]
        path = getattr(run, field) or run.profile
        if path is not None:
            try:
                cost = ProfileCost.from_csv(path)
            except (OSError, ValueError, KeyError) as err:
                raise PdlabError(f"run {run.name}: {field} {path}: {err}") from None
        if run.step_overhead_ms:
            cost = ServedCost(cost, overhead_seconds(run.step_overhead_ms))
        return InstanceSpec(scheduler, num_blocks, e.block_size, cost, e.async_scheduling)

    link = LINKS[run.link]
    if run.link_bandwidth_gbps is not None:
        link = replace(link, bandwidth_bytes_per_s=run.link_bandwidth_gbps * 1e9)
    if run.mode == "colocated":
        tps = [run.tp("mixed", e.tensor_parallel_size)] * run.num_instances
    else:
        tps = [run.tp("prefill", e.tensor_parallel_size)] * run.num_prefill + \
              [run.tp("decode", e.tensor_parallel_size)] * run.num_decode
    # Instances on shared GPUs share each GPU's throughput (time-sliced, or MPS with SM limits per role).
    gpu_of = None if run.num_gpus is None else tuple(ids[0] for ids in gpus_of(tps, run.num_gpus))
    roles = ["mixed"] * run.num_instances if run.mode == "colocated" else \
        ["prefill"] * run.num_prefill + ["decode"] * run.num_decode
    sm_share = tuple(run.sm_percentage.get(role, 100) / 100 for role in roles) if run.gpu_sharing == "mps" else None
    sharing = dict(gpu_of=gpu_of, gpu_sharing=run.gpu_sharing, sm_share=sm_share, mps_capacity=run.mps_capacity)
    if run.mode == "colocated":
        layout = Layout(instance("mixed"), mode="colocated", num_instances=run.num_instances, routing=run.routing,
                        **sharing)
    else:
        layout = Layout(instance("prefill"), mode="disaggregated", num_prefill=run.num_prefill,
                        num_decode=run.num_decode, decode_instance=instance("decode"), link=link,
                        kv_bytes_per_token=model.kv_bytes_per_token(2), num_layers=model.num_layers,
                        routing=run.routing, **sharing)
    with tqdm(total=len(requests), desc=desc or f"{run.name} (simulated)", disable=not progress, unit="req") as bar:
        update = (lambda n: bar.update(n - bar.n)) if progress else None
        simulated = simulate(requests, layout, None, seed=exp.seed, progress=update)
    records = [replace(r, mode=run.mode) for r in simulated]
    return RunResult(run, records, summarize_run(exp, records), backend="sim")


def build_requests(exp: Experiment, tokenizer) -> list[RequestSpec]:
    """The experiment's requests; identical for every run of the experiment (same seed)."""
    from pdlab.models.tokenizer import encode_chat

    return make_workload(
        exp.workload.to_spec(),
        vocab_size=tokenizer.vocab_size,
        seed=exp.seed,
        encode_prompt=lambda text: encode_chat(tokenizer, [{"role": "user", "content": text}]),
    )


def params_for(exp: Experiment, spec: RequestSpec):
    # Synthetic prompts always run to their drawn output length, as serving benchmarks do;
    # real text prompts stop at end-of-sequence unless the experiment says otherwise.
    params = exp.sampling.to_params(max_tokens=spec.max_tokens, seed=exp.seed * 1_000_003 + int(spec.request_id.split("-")[-1]))
    if spec.prompt_text is None and not params.ignore_eos:
        params = replace(params, ignore_eos=True)
    return params


def run_experiment(exp: Experiment, progress: bool = True, write: bool = True, only: Sequence[str] = ()
                   ) -> ExperimentResult:
    """Every run (or those named in `only`), on each of its backends, at each rate of the sweep (or once);
    results by label. With `write`, results are written as each rate is measured, so an interrupted
    experiment keeps what finished. A run that fails is recorded with its error and the next goes on
    (`ExperimentResult.failures`); a mistake in the experiment itself (PdlabError) still ends it at once
    when it comes before anything ran."""
    runs = select_runs(exp, only)
    check_model(exp, runs)
    out_dir = exp.output_dir / exp.name if write else None
    if out_dir is not None:
        check_writable(out_dir)
    log_dir = out_dir / "logs" if out_dir is not None else None
    backends = {"real": run_real, "sim": run_sims}
    result = ExperimentResult(exp, {}, out_dir)
    for run in runs:
        for backend in run.backends:
            name = run.name + ("@sim" if backend == "sim" and run.backend == "both" else "")
            try:
                for r in backends[backend](exp, run, progress, log_dir):
                    result.runs[r.label] = r
                    if write:
                        write_results(result)
            except Exception as e:  # recorded with its error; the next run goes on
                result.failures[name] = _one_line(e)
                print(f"run {name} failed: {result.failures[name]}", file=sys.stderr)
                if write:
                    write_results(result)
    return result


def select_runs(exp: Experiment, only: Sequence[str]) -> list[RunSection]:
    names = [run.name for run in exp.runs]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ConfigError(f"--runs: no run named {', '.join(unknown)} in this experiment (its runs: {', '.join(names)})")
    return [run for run in exp.runs if not only or run.name in only]


def check_model(exp: Experiment, runs: Sequence[RunSection]) -> None:
    """Fail now, with the model's error, if a run cannot find its model (every run would fail alike)."""
    backends = {backend for run in runs for backend in run.backends}
    if "real" in backends:
        from pdlab.cluster.deployment import check_device
        from pdlab.models.source import resolve_model

        resolve_model(exp.model.name)
        check_device(exp.instance_args())  # e.g. cuda asked for on a machine without it
    if "sim" in backends:
        from pdlab.models.source import model_config
        from pdlab.sim.models import sim_model

        sim_model(exp.model.name, model_config)


def check_writable(out_dir: Path) -> None:
    """Fail now, before anything runs, if results cannot be written under `out_dir`."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write results under {out_dir}: {e.strerror or e}") from None


def _one_line(error: Exception) -> str:
    """An error's message on one line (a launch error's log tail cut to its last line); the type too
    when it is not one of pdlab's own (a bug, not a mistake of the user's)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = " ... ".join(lines[:1] + lines[1:][-1:]) or type(error).__name__
    return text if isinstance(error, PdlabError) else f"{type(error).__name__}: {text}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdlab.run", description=__doc__.split("\n")[0])
    parser.add_argument("experiment", help="an experiment YAML file, e.g. experiments/quickstart.yaml")
    parser.add_argument("--output-dir", type=Path, help="override the file's output_dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the file, e.g. --set workload.num_requests=8 (repeatable)")
    parser.add_argument("--runs", default="", metavar="NAME,NAME",
                        help="run only these runs of the file (default all)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    # SIGTERM ends the experiment as Ctrl-C does: the deployment stops its instances, results so far stay.
    from pdlab.cluster.launch import Terminated, interrupt_on_sigterm

    interrupt_on_sigterm()
    out_dir = None
    try:
        exp = load_experiment(args.experiment, args.overrides)
        if args.output_dir is not None:
            exp = exp.model_copy(update={"output_dir": args.output_dir})
        out_dir = exp.output_dir / exp.name
        result = run_experiment(exp, progress=not args.no_progress,
                                only=[n.strip() for n in args.runs.split(",") if n.strip()])
    except PdlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        kept = f"; the rates measured so far are in {out_dir}/" if out_dir is not None and out_dir.exists() else ""
        print(f"\ninterrupted: instances stopped{kept}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    if result.runs:
        print(format_report(result))
    if result.failures:
        failed = "; ".join(f"{name}: {error}" for name, error in result.failures.items())
        print(f"error: {len(result.failures)} run(s) failed ({failed})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
