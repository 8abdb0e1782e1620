"""`python -m pdlab.run EXPERIMENT.yaml`: run an experiment, print its table, write its results.

Writes under `<output_dir>/<name>/`: `records.csv` (one row per request and
run), `summary.csv`, `texts.json` (the generated answers to the text prompts),
`cdf.png/.svg` and `timeline.png/.svg`, and `provenance.json` (the config, git
commit, software versions and device).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from pdlab.errors import PdlabError
from pdlab.experiment import Experiment, RunSection, load_experiment
from pdlab.metrics.records import RequestRecord, write_records_csv
from pdlab.metrics.summary import summarize, summary_table
from pdlab.workload.workload import RequestSpec, make_workload

TABLE_ROWS = [
    "num_completed", "request_throughput_rps", "output_throughput_tokens_per_s",
    "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p90_ms", "tpot_p99_ms",
    "e2e_p50_ms", "e2e_p90_ms", "slo_attainment", "goodput_rps",
]


@dataclass
class RunResult:
    run: RunSection
    records: list[RequestRecord]
    summary: dict
    texts: dict[str, dict[str, str]] = field(default_factory=dict)  # request id -> prompt, answer


@dataclass
class ExperimentResult:
    experiment: Experiment
    runs: dict[str, RunResult]
    out_dir: Path | None

    @property
    def table(self) -> pd.DataFrame:
        return summary_table({name: r.summary for name, r in self.runs.items()})

    @property
    def records(self) -> dict[str, list[RequestRecord]]:
        return {name: r.records for name, r in self.runs.items()}


def run_real(exp: Experiment, run: RunSection, progress: bool, log_dir: Path | None = None) -> RunResult:
    """Serve the workload on real instance processes of the run's layout; time it at the client."""
    from pdlab.backends.replay import replay
    from pdlab.cluster.client import RemoteEngine
    from pdlab.cluster.deploy import Deployment
    from pdlab.models.source import resolve_model

    tokenizer = resolve_model(exp.model.name).load_tokenizer()
    requests = build_requests(exp, tokenizer)
    deployment = Deployment(exp.model.name, run.mode, exp.instance_args(), protocol=run.transfer_protocol,
                            num_prefill=run.num_prefill, log_dir=log_dir,
                            tensor_parallel_size=exp.engine.tensor_parallel_size)
    with deployment:
        engine = RemoteEngine(deployment.endpoint)
        try:
            records, outputs = replay(engine, requests, lambda spec: params_for(exp, spec), run.mode, progress=progress)
        finally:
            engine.close()
    texts = {spec.request_id: {"prompt": spec.prompt_text, "answer": outputs[spec.request_id].text}
             for spec in requests if spec.prompt_text is not None}
    return RunResult(run, records, _summarize(exp, records), texts)


def run_sim(exp: Experiment, run: RunSection, progress: bool, log_dir: Path | None = None) -> RunResult:
    """Serve the same request list in the SimPy model: the real scheduler, a roofline cost per step."""
    from pdlab.models.source import resolve_model
    from pdlab.models.tokenizer import ByteTokenizer
    from pdlab.policy.scheduler import SchedulerConfig
    from pdlab.sim import GPUS, LINKS, InstanceSpec, Layout, simulate
    from pdlab.sim.models import SIM_MODELS, sim_model

    sim = sim_model(exp.model.name)  # the dense presets, the simulator-only MoE models, or a model directory
    model = sim.config
    tokenizer = ByteTokenizer.for_config(model) if exp.model.name in SIM_MODELS \
        else resolve_model(exp.model.name).load_tokenizer()
    requests = build_requests(exp, tokenizer)
    e = exp.engine
    weight_bits = {None: 16, "wint8": 8, "wint4": 4}[exp.model.quantization]
    try:
        cost = sim.cost(GPUS[run.gpu], tp=e.tensor_parallel_size, weight_bits=weight_bits)
    except ValueError as err:
        raise PdlabError(f"engine.tensor_parallel_size: {err}") from None
    max_model_len = e.max_model_len or min(model.max_position_embeddings, 8192)
    try:
        scheduler = SchedulerConfig(
            max_num_seqs=e.max_num_seqs,
            max_num_batched_tokens=e.max_num_batched_tokens or (2048 if e.enable_chunked_prefill else max_model_len),
            enable_chunked_prefill=e.enable_chunked_prefill, max_model_len=max_model_len)
    except ValueError as err:
        raise PdlabError(f"engine: {err}") from None
    num_blocks = e.num_blocks or cost.max_num_blocks(e.block_size, e.gpu_memory_utilization)
    if num_blocks * e.block_size < max_model_len:
        raise PdlabError(f"run {run.name}: {model.name}'s weights leave room for {num_blocks * e.block_size} KV tokens "
                         f"per GPU, fewer than max_model_len ({max_model_len}); raise engine.tensor_parallel_size "
                         f"or quantize (model.quantization)")
    layout = Layout(InstanceSpec(scheduler, num_blocks, e.block_size), mode=run.mode, num_prefill=run.num_prefill,
                    link=LINKS[run.link], kv_bytes_per_token=model.kv_bytes_per_token(2), num_layers=model.num_layers,
                    routing=run.routing)
    records = [replace(r, mode=run.mode) for r in simulate(requests, layout, cost, seed=exp.seed)]
    return RunResult(run, records, _summarize(exp, records))


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


def _summarize(exp: Experiment, records: list[RequestRecord]) -> dict:
    return summarize(records, slo_ttft_s=exp.slo.ttft_s, slo_tpot_s=exp.slo.tpot_s)


def run_experiment(exp: Experiment, progress: bool = True, write: bool = True) -> ExperimentResult:
    out_dir = exp.output_dir / exp.name if write else None
    log_dir = out_dir / "logs" if out_dir is not None else None
    backends = {"real": run_real, "sim": run_sim}
    runs = {run.name: backends[run.backend](exp, run, progress, log_dir) for run in exp.runs}
    result = ExperimentResult(exp, runs, out_dir)
    if write:
        write_results(result)
    return result


def write_results(result: ExperimentResult) -> list[Path]:
    from pdlab import plots
    from pdlab.provenance import provenance

    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    exp = result.experiment
    all_records = [r for run in result.runs.values() for r in run.records]
    files = [write_records_csv(all_records, out / "records.csv")]
    result.table.to_csv(out / "summary.csv")
    files.append(out / "summary.csv")
    (out / "texts.json").write_text(json.dumps({n: r.texts for n, r in result.runs.items()}, indent=2))
    meta = {"experiment": exp.model_dump(mode="json"), **provenance()}
    (out / "provenance.json").write_text(json.dumps(meta, indent=2))
    files += [out / "texts.json", out / "provenance.json"]
    files += plots.save_figure(plots.cdf_figure(result.records, exp.slo.ttft_s, exp.slo.tpot_s), out / "cdf")
    files += plots.save_figure(plots.timeline_figure(result.records), out / "timeline")
    return files


def format_report(result: ExperimentResult, max_texts: int = 3) -> str:
    table = result.table.loc[[r for r in TABLE_ROWS if r in result.table.index]]
    lines = [table.to_string(float_format=lambda v: f"{v:,.2f}"), ""]
    for name, run in result.runs.items():
        for rid, t in list(run.texts.items())[:max_texts]:
            lines.append(f"[{name}] {t['prompt']!r}\n    -> {t['answer']!r}")
    if result.out_dir is not None:
        lines.append(f"\nresults written to {result.out_dir}/")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdlab.run", description=__doc__.split("\n")[0])
    parser.add_argument("experiment", help="an experiment YAML file, e.g. experiments/quickstart.yaml")
    parser.add_argument("--output-dir", type=Path, help="override the file's output_dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the file, e.g. --set workload.num_requests=8 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    try:
        exp = load_experiment(args.experiment, args.overrides)
        if args.output_dir is not None:
            exp = exp.model_copy(update={"output_dir": args.output_dir})
        result = run_experiment(exp, progress=not args.no_progress)
    except PdlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
