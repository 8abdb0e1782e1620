"""An experiment's results: what each run measured, the files they are written to, how they are read back
and printed. `pdlab.run` fills them; notebooks and comparisons read committed ones with `load_result`.

Written under `<output_dir>/<name>/`: `records.csv` (one row per request and run), `summary.csv`,
`texts.json` (the generated answers to the text prompts), `cdf.png/.svg`, `timeline.png/.svg`, `sweep.csv`
and its plot for a rate sweep, and `provenance.json` (the config, git commit, software versions, device and
the runs that failed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from pdlab.experiment import Experiment, RunSection
from pdlab.metrics.records import RequestRecord, records_to_frame
from pdlab.metrics.summary import summarize, summary_table

# The printed table: summary metric -> the name a reader sees, with its unit (the sweep's columns too).
TABLE_ROWS = {
    "num_completed": "completed requests",
    "request_throughput_rps": "throughput (req/s)",
    "output_throughput_tokens_per_s": "output throughput (tokens/s)",
    "ttft_p50_ms": "TTFT p50 (ms)", "ttft_p90_ms": "TTFT p90 (ms)", "ttft_p99_ms": "TTFT p99 (ms)",
    "tpot_p50_ms": "TPOT p50 (ms)", "tpot_p90_ms": "TPOT p90 (ms)", "tpot_p99_ms": "TPOT p99 (ms)",
    "e2e_p50_ms": "E2E latency p50 (ms)", "e2e_p90_ms": "E2E latency p90 (ms)",
    "slo_attainment": "within SLOs (%)",
    "goodput_rps": "goodput (req/s within SLOs)",
}
SWEEP_LABELS = {**TABLE_ROWS, "rate_rps": "rate (req/s)", "goodput_rps": "goodput (req/s)",
                "slow_start": "slow start"}
METRIC_LEGEND = ("TTFT: arrival to first token; TPOT: time per output token after the first; "
                 "E2E: arrival to last token.")


@dataclass
class RunResult:
    run: RunSection
    records: list[RequestRecord]
    summary: dict
    texts: dict[str, dict[str, str]] = field(default_factory=dict)  # request id -> prompt, answer
    backend: str = "real"
    rate_rps: float | None = None  # the sweep's rate (None: the file's workload)

    @property
    def label(self) -> str:
        """`run`, with `@sim` for a simulated one beside a real one and `@R` for a sweep's rate R (req/s)."""
        label = self.run.name + ("@sim" if self.backend == "sim" and self.run.backend == "both" else "")
        return label if self.rate_rps is None else f"{label}@{self.rate_rps:g}"


@dataclass
class ExperimentResult:
    experiment: Experiment
    runs: dict[str, RunResult]
    out_dir: Path | None
    failures: dict[str, str] = field(default_factory=dict)  # run (and backend) -> its error, one line
    provenance: dict = field(default_factory=dict)  # where it was measured (load_result: the provenance.json)

    @property
    def table(self) -> pd.DataFrame:
        return summary_table({name: r.summary for name, r in self.runs.items()})

    @property
    def records(self) -> dict[str, list[RequestRecord]]:
        return {name: r.records for name, r in self.runs.items()}

    def with_slo(self, ttft_ms: float | None, tpot_ms: float | None) -> ExperimentResult:
        """The same runs judged against other SLOs (every summary recomputed from the records)."""
        from pdlab.experiment import SloSection

        exp = self.experiment.model_copy(update={"slo": SloSection(ttft_ms=ttft_ms, tpot_ms=tpot_ms)})
        runs = {label: replace(r, summary=summarize_run(exp, r.records)) for label, r in self.runs.items()}
        return ExperimentResult(exp, runs, self.out_dir, dict(self.failures), self.provenance)

    @property
    def sweep(self) -> pd.DataFrame:
        """One row per run, backend and rate: the summary's metrics (what goodput-vs-rate plots read)."""
        rows = [{"run": r.run.name, "backend": r.backend, "mode": r.run.mode, "rate_rps": r.rate_rps, **r.summary}
                for r in self.runs.values()]
        return pd.DataFrame(rows)


def summarize_run(exp: Experiment, records: list[RequestRecord]) -> dict:
    return summarize(records, slo_ttft_s=exp.slo.ttft_s, slo_tpot_s=exp.slo.tpot_s)


def write_results(result: ExperimentResult) -> list[Path]:
    from pdlab import plots
    from pdlab.provenance import provenance

    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    exp = result.experiment
    meta = {"experiment": exp.model_dump(mode="json"), **provenance(), "failures": result.failures}
    (out / "provenance.json").write_text(json.dumps(meta, indent=2))
    if not result.runs:
        return [out / "provenance.json"]
    frames = []
    for label, run in result.runs.items():  # the record schema, with the run's label and rate in front
        frame = records_to_frame(run.records)
        frame.insert(0, "rate_rps", run.rate_rps)
        frame.insert(0, "run", label)
        frames.append(frame)
    records = pd.concat(frames, ignore_index=True)
    records["token_times_s"] = records["token_times_s"].map(json.dumps)
    records.to_csv(out / "records.csv", index=False)
    files = [out / "records.csv"]
    result.table.to_csv(out / "summary.csv")
    files.append(out / "summary.csv")
    (out / "texts.json").write_text(json.dumps({n: r.texts for n, r in result.runs.items()}, indent=2))
    files += [out / "texts.json", out / "provenance.json"]
    # Distributions at one load: the file's workload, or the sweep's highest rate.
    done = [r.rate_rps for r in result.runs.values()]
    top = exp.rates[-1] if exp.rates[-1] in done else max(done, key=lambda rate: rate or 0)  # while a sweep runs
    last = {label: r.records for label, r in result.runs.items() if r.rate_rps == top}
    cdf = plots.cdf_figure(last, exp.slo.ttft_s, exp.slo.tpot_s)
    if top is not None:  # say which load the distributions are of (the highest rate measured)
        cdf.suptitle(f"at {top:g} req/s, the highest rate measured")
    files += plots.save_figure(cdf, out / "cdf")
    files += plots.save_figure(plots.timeline_figure(last), out / "timeline")
    if exp.sweep is not None:
        result.sweep.to_csv(out / "sweep.csv", index=False)
        slo = ", ".join(f"{k} {v:g} ms" for k, v in (("TTFT", exp.slo.ttft_ms), ("TPOT", exp.slo.tpot_ms)) if v)
        files += [out / "sweep.csv", *plots.save_figure(plots.sweep_figure(result.sweep, slo), out / "sweep")]
    return files


SWEEP_COLUMNS = ["run", "backend", "rate_rps", "request_throughput_rps", "goodput_rps", "slo_attainment",
                 "ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms", "tpot_p90_ms", "slow_start"]


def records_path(out_dir: str | Path) -> Path:
    """An experiment's records: records.csv, or its gzipped copy (how large results are committed)."""
    plain = Path(out_dir) / "records.csv"
    return plain if plain.exists() or not plain.with_suffix(".csv.gz").exists() else plain.with_suffix(".csv.gz")


def load_result(out_dir: str | Path) -> ExperimentResult:
    """An experiment's results as `write_results` left them (records.csv, or records.csv.gz as committed
    under data/results/, and provenance.json): GPU runs read on any machine, by notebooks and comparisons."""
    from pdlab.experiment import parse_experiment
    from pdlab.metrics.records import frame_to_records

    out_dir = Path(out_dir)
    meta = json.loads((out_dir / "provenance.json").read_text())
    exp = parse_experiment(meta["experiment"], str(out_dir / "provenance.json"))
    frame = pd.read_csv(records_path(out_dir), dtype={"request_id": str, "error": str, "finish_reason": str},
                        keep_default_na=False, na_values=[""])
    by_name = {run.name: run for run in exp.runs}
    runs = {}
    for label, rows in frame.groupby("run", sort=False):
        records = frame_to_records(rows)
        rate = rows["rate_rps"].iloc[0]
        rate = None if pd.isna(rate) else float(rate)
        run = by_name[label.split("@")[0]]
        runs[label] = RunResult(run, records, summarize_run(exp, records), backend=records[0].backend, rate_rps=rate)
    return ExperimentResult(exp, runs, out_dir, dict(meta.get("failures") or {}), meta)


def format_report(result: ExperimentResult, max_texts: int = 3) -> str:
    """The metrics table (readable names, units; metrics without a value left out), what its names and SLOs
    mean, and the first answers of each run."""
    from pdlab.metrics.summary import SLOW_START_RATIO

    notes = [METRIC_LEGEND]
    as_percent = {"slo_attainment": 100.0}
    if result.experiment.sweep is not None:  # one row per run, backend and rate
        sweep = result.sweep
        frame = sweep[[c for c in SWEEP_COLUMNS if c in sweep.columns]].dropna(axis="columns", how="all")
        frame = frame.assign(**{c: frame[c] * k for c, k in as_percent.items() if c in frame})
        table = frame.rename(columns=SWEEP_LABELS).to_string(index=False, float_format=lambda v: f"{v:,.2f}")
        if "slow_start" in frame:
            notes.append(f"slow start: the first tenth of the requests had a TTFT p50 over {SLOW_START_RATIO:g}x "
                         "the rest's.")
    else:
        frame = result.table.loc[[r for r in TABLE_ROWS if r in result.table.index]].dropna(how="all")
        for row, k in as_percent.items():
            if row in frame.index:
                frame.loc[row] *= k
        table = frame.rename(index=TABLE_ROWS).rename_axis(None).to_string(float_format=lambda v: f"{v:,.2f}")
    slo = result.experiment.slo
    limits = [f"{name} <= {ms:g} ms" for name, ms in (("TTFT", slo.ttft_ms), ("TPOT", slo.tpot_ms)) if ms]
    notes.append(f"SLOs judged against: {' and '.join(limits)} (goodput and 'within SLOs' count the requests that "
                 f"met {'both' if len(limits) == 2 else 'it'})" if limits
                 else "No SLOs set (slo.ttft_ms, slo.tpot_ms): goodput not judged.")
    lines = [table, "", *notes]
    texts = [f"[{name}] {t['prompt']!r}\n    -> {t['answer']!r}"
             for name, run in result.runs.items() for t in list(run.texts.values())[:max_texts]]
    if texts:
        lines += ["", *texts]
    if result.out_dir is not None:
        lines += ["", f"results written to {result.out_dir}/"]
    return "\n".join(lines)
