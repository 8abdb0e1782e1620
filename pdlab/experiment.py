"""The experiment file: one YAML document, nested by concern, read by `load_experiment`.

    name: quickstart
    seed: 0
    model: {name: smollm2, dtype: auto, device: auto}
    engine: {block_size: 16, max_num_seqs: 16, enable_chunked_prefill: true}
    workload:
      num_requests: 32
      arrival: {kind: poisson, rate_rps: 4}
      prompt_len: {kind: lognormal, median_tokens: 64, sigma: 0.6, max_tokens: 256}
      output_len: {kind: uniform, min_tokens: 16, max_tokens: 48}
    sampling: {temperature: 0}
    runs: [{name: colocated, mode: colocated}]
    slo: {ttft_ms: 1000, tpot_ms: 200}

Every mistake (a YAML syntax error, an unknown key, a wrong type or value, a
missing file) raises one `ConfigError` whose message names the file, the line
and the field, e.g. `experiments/x.yaml:7: workload.arrival.rate_rps: Input
should be greater than 0`, or the override that made it (`--set
workload.num_request=8: unknown key (did you mean num_requests?)`). Relative paths inside the file (`workload.trace`)
are relative to the working directory, like every path on the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pdlab.errors import ConfigError
from pdlab.sampling_params import SamplingParams
from pdlab.workload.config import WorkloadSection
from pdlab.yaml_config import Section, UniqueKeyLoader, apply_overrides, describe_error, location, override_of

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]  # used in result paths


class ModelSection(Section):
    name: str = "smollm2"  # a preset, a Hugging Face model directory or a GGUF file
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    quantization: Literal["wint8", "wint4"] | None = None  # weight-only, of the linears


class EngineSection(Section):
    """The engine's knobs; names and meanings as in `pdlab.engine.config.EngineConfig`."""

    block_size: PositiveInt = 16
    num_blocks: PositiveInt | None = None
    kv_cache_memory_bytes: PositiveInt | None = None
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_num_seqs: PositiveInt = 64
    max_num_batched_tokens: PositiveInt | None = None
    enable_chunked_prefill: bool = True
    max_model_len: PositiveInt | None = None
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    tensor_parallel_size: PositiveInt = 1
    enforce_eager: bool = False  # no CUDA graphs
    cuda_graph_max_tokens: NonNegativeInt = 1024  # steps with prefill chunks up to this many tokens: piecewise graphs
    async_scheduling: bool = False  # queue the next decode step before the host has this one's tokens


class SamplingSection(Section):
    temperature: NonNegativeFloat = 1.0  # 0 is greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: NonNegativeInt = 0  # 0 disables it
    ignore_eos: bool = False

    def to_params(self, max_tokens: int, seed: int | None = None) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, seed=seed, **self.model_dump())


Role = Literal["mixed", "prefill", "decode"]


class RunSection(Section):
    """One layout to serve the workload with: `num_instances` colocated instances, or `num_prefill` prefill
    and `num_decode` decode instances (xPyD), each phase with its own tensor-parallel size."""

    name: Name
    mode: Literal["colocated", "disaggregated"] = "colocated"
    transfer_protocol: Literal["tcp", "ipc", "rdma"] = "ipc"  # disaggregated: how the KV moves (FastDeploy's: ipc)
    num_instances: PositiveInt = 1  # colocated: replicas; requests go to the least loaded
    num_prefill: PositiveInt = 1  # disaggregated: prefill instances (every decode instance uses all of them)
    num_decode: PositiveInt = 1  # disaggregated: decode instances, the entry points; requests go to the least loaded
    # GPUs per instance; None: engine.tensor_parallel_size. `tensor_parallel_size` is the colocated
    # instances', `prefill_tp` and `decode_tp` the disaggregated phases'.
    tensor_parallel_size: PositiveInt | None = None
    prefill_tp: PositiveInt | None = None
    decode_tp: PositiveInt | None = None
    # real: instance processes on this machine; sim: the SimPy model with an analytical cost model; both: each.
    backend: Literal["real", "sim", "both"] = "real"
    gpu: Literal["h100"] = "h100"  # sim: the GPU the roofline cost model assumes
    # sim: step times from profile tables (`python -m pdlab.profiler`, one per phase's TP size) instead of
    # the roofline; `profile` for every instance, or `prefill_profile`/`decode_profile` per phase.
    profile: Path | None = None
    prefill_profile: Path | None = None
    decode_profile: Path | None = None
    # sim: milliseconds a served instance adds to every engine step (its loop, scheduling, outputs), measured
    # against real runs (docs/one_gpu.md): one figure, or {sequences in the step: ms} interpolated in
    # between (`python -m pdlab.fidelity --measure-overhead`); 0: the engine's step alone.
    step_overhead_ms: NonNegativeFloat | dict[PositiveInt, NonNegativeFloat] = 0.0
    link: Literal["nvlink", "pcie", "rdma", "ideal"] = "nvlink"  # sim, disaggregated: the KV link
    link_bandwidth_gbps: PositiveFloat | None = None  # sim: the link's bandwidth in GB/s instead of its preset's
    # sim: who picks the instances (pdlab/sim/cluster.py): innode, the decode entry point picks a prefill;
    # splitwise, a router picks both by FastDeploy's loads. A real run's routing is innode.
    routing: Literal["innode", "splitwise"] = "innode"
    # Instances that share a GPU (a 1P1D pair on one card): time-sliced by the driver, or side by side under
    # CUDA MPS with an SM limit per role (percent; 100 or absent: no limit); each role's share of the card's
    # memory (its gpu_memory_utilization; default: engine.gpu_memory_utilization split evenly); and whether a
    # decode instance maps the prefill's weights instead of loading a copy.
    gpu_sharing: Literal["time", "mps"] = "time"
    # sim: the GPUs the layout is placed on, as a real deployment places it on a machine with that many (instances
    # wrap around and share): instances on one GPU share its throughput, one GPU's worth time-sliced and under MPS
    # `mps_capacity` GPUs' worth together (pdlab/sim/gpus.py). None: each instance has its own GPU.
    num_gpus: PositiveInt | None = None
    mps_capacity: float = Field(1.0, ge=1, le=4)
    sm_percentage: dict[Role, Annotated[int, Field(ge=1, le=100)]] = {}
    memory_share: dict[Role, Annotated[float, Field(gt=0, le=1)]] = {}
    share_weights: bool = True

    @model_validator(mode="after")
    def _check_layout(self):
        if self.sm_percentage and self.gpu_sharing != "mps":
            raise ValueError("sm_percentage needs gpu_sharing: mps (time-sliced instances cannot be limited)")
        if self.routing == "splitwise" and self.backend != "sim":
            raise ValueError("routing: splitwise runs only with backend: sim (a real splitwise deployment needs Redis: "
                             "docs/splitwise.md)")
        if self.mode == "colocated":
            extra = [f for f in ("prefill_tp", "decode_tp") if getattr(self, f) is not None]
            extra += [f for f in ("num_prefill", "num_decode") if getattr(self, f) != 1]
            if extra:
                raise ValueError(f"{', '.join(extra)}: only for mode: disaggregated (a colocated run has "
                                 "num_instances and tensor_parallel_size)")
        else:
            if self.num_instances != 1 or self.tensor_parallel_size is not None:
                raise ValueError("num_instances and tensor_parallel_size are for mode: colocated; a disaggregated run "
                                 "has num_prefill, num_decode, prefill_tp and decode_tp")
            if self.backend != "sim" and (self.prefill_tp or 0) != (self.decode_tp or 0):
                raise ValueError("a real disaggregated run needs prefill_tp == decode_tp (rank r of the prefill sends to "
                                 "rank r of the decode); different sizes run with backend: sim")
        return self

    @property
    def backends(self) -> tuple[str, ...]:
        return ("real", "sim") if self.backend == "both" else (self.backend,)

    def tp(self, phase: Literal["mixed", "prefill", "decode"], default: int) -> int:
        value = {"mixed": self.tensor_parallel_size, "prefill": self.prefill_tp, "decode": self.decode_tp}[phase]
        return default if value is None else value


class SweepSection(Section):
    """Run every run at each of these arrival rates (replacing `workload.arrival.rate_rps`)."""

    rates_rps: tuple[PositiveFloat, ...] = Field(min_length=1)


class SloSection(Section):
    ttft_ms: PositiveFloat | None = None
    tpot_ms: PositiveFloat | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.ttft_ms is None else self.ttft_ms / 1e3

    @property
    def tpot_s(self) -> float | None:
        return None if self.tpot_ms is None else self.tpot_ms / 1e3


class Experiment(Section):
    name: Name
    seed: NonNegativeInt = 0
    model: ModelSection = ModelSection()
    engine: EngineSection = EngineSection()
    workload: WorkloadSection
    sampling: SamplingSection = SamplingSection()
    runs: tuple[RunSection, ...] = Field((RunSection(name="colocated"),), min_length=1)
    slo: SloSection = SloSection()
    sweep: SweepSection | None = None
    # Requests each real deployment serves at the first rate, and discards, before its first measured rate
    # (the first seconds of a fresh instance are slower: kernel compilation, allocator growth).
    warmup_requests: NonNegativeInt = 0
    output_dir: Path = Path("results")

    @field_validator("sweep")
    @classmethod
    def _sweep_needs_a_rate(cls, sweep: SweepSection | None, info: ValidationInfo) -> SweepSection | None:
        workload = info.data.get("workload")
        if sweep is not None and workload is not None and getattr(workload.arrival, "rate_rps", False) is False:
            raise ValueError(f"sweep.rates_rps needs an arrival with a rate (poisson, gamma, constant or trace), "
                             f"not {workload.arrival.kind}")
        return sweep

    @property
    def rates(self) -> tuple[float | None, ...]:
        """The sweep's rates, or (None,): the file's own workload."""
        return self.sweep.rates_rps if self.sweep is not None else (None,)

    def at_rate(self, rate_rps: float | None) -> Experiment:
        """This experiment with its arrivals at `rate_rps` (None: unchanged)."""
        if rate_rps is None:
            return self
        arrival = self.workload.arrival.model_copy(update={"rate_rps": rate_rps})
        return self.model_copy(update={"workload": self.workload.model_copy(update={"arrival": arrival})})

    def warmup(self) -> Experiment:
        """The warm-up load: `warmup_requests` requests at the first rate, drawn with another seed."""
        workload = self.at_rate(self.rates[0]).workload.model_copy(update={"num_requests": self.warmup_requests})
        return self.model_copy(update={"workload": workload, "seed": self.seed + 1})

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, value: Any) -> Any:
        # `model: smollm2` is short for `model: {name: smollm2}`.
        return {"name": value} if isinstance(value, str) else value

    @field_validator("workload")
    @classmethod
    def _fits_model_len(cls, workload: WorkloadSection, info: ValidationInfo) -> WorkloadSection:
        engine = info.data.get("engine")
        need, limit = workload.max_request_tokens, engine.max_model_len if engine else None
        if need is not None and limit is not None and need > limit:
            raise ValueError(
                f"requests can need up to {need} prompt + output tokens, more than engine.max_model_len ({limit})"
            )
        return workload

    @field_validator("runs")
    @classmethod
    def _unique_run_names(cls, runs: tuple[RunSection, ...]) -> tuple[RunSection, ...]:
        names = [run.name for run in runs]
        if len(set(names)) != len(names):
            raise ValueError(f"run names must be unique, got {names}")
        return runs

    def instance_args(self) -> list[str]:
        """The same settings as command-line flags of an instance process, apart from its TP size (per run and
        role) and its `--gpu-memory-utilization` (`Deployment.gpu_memory_utilization`: a share of a GPU that
        instances may share)."""
        e = self.engine
        flags = ["--dtype", self.model.dtype, "--device", self.model.device, "--seed", str(self.seed),
                 "--block-size", str(e.block_size), "--max-num-seqs", str(e.max_num_seqs), "--attention-backend", e.attention_backend,
                 *(["--enforce-eager"] if e.enforce_eager else []), "--cuda-graph-max-tokens", str(e.cuda_graph_max_tokens),
                 *(["--async-scheduling"] if e.async_scheduling else []),
                 "--enable-chunked-prefill" if e.enable_chunked_prefill else "--no-enable-chunked-prefill"]
        optional = {"--num-gpu-blocks": e.num_blocks, "--kv-cache-memory-bytes": e.kv_cache_memory_bytes,
                    "--max-num-batched-tokens": e.max_num_batched_tokens, "--max-model-len": e.max_model_len,
                    "--quantization": self.model.quantization}
        for flag, value in optional.items():
            if value is not None:
                flags += [flag, str(value)]
        return flags

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `pdlab.engine.config.EngineConfig` for this experiment."""
        return {
            "model": self.model.name,
            "dtype": self.model.dtype,
            "device": self.model.device,
            "quantization": self.model.quantization,
            "seed": self.seed,
            **self.engine.model_dump(),
        }


def load_experiment(path: str | Path, overrides: list[str] = ()) -> Experiment:
    """Read and validate an experiment YAML file; any mistake raises one ConfigError.

    `overrides` are `dotted.key=value` strings applied before validation, e.g.
    `workload.num_requests=8` (the command line's `--set`).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such experiment file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the experiment file: {e}") from None
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: malformed YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from None
    overrides = list(overrides)
    if overrides and isinstance(data, dict):
        apply_overrides(data, overrides)
    experiment = parse_experiment(data, str(path), text, overrides)
    trace = experiment.workload.trace
    if trace is not None and not trace.is_file():
        keys = ["workload", "trace"]
        override = override_of(keys, overrides)
        blame = f"--set {override}" if override else f"{location(str(path), text, keys)}: workload.trace"
        raise ConfigError(f"{blame}: no such file: {trace}")
    return experiment


def parse_experiment(data: Any, source: str = "<experiment>", text: str | None = None,
                     overrides: list[str] = ()) -> Experiment:
    """Validate already-parsed settings; `text`, the YAML they came from, adds line numbers to errors, and
    an error in what one of `overrides` (`dotted.key=value`, applied to `data` already) set names it."""
    if not isinstance(data, dict):
        got = "an empty document" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{source}: expected a mapping of settings (name, workload, ...) at the top level, got {got}")
    try:
        return Experiment.model_validate(data)
    except ValidationError as e:
        raise ConfigError("\n".join(describe_error(err, Experiment, source, text, list(overrides))
                                     for err in e.errors())) from None


def whatif_experiment(rate_rps: float = 8.0, num_prefill: int = 1, num_decode: int = 1,
                      prompt_median_tokens: int = 1024, output_median_tokens: int = 128, link_gbps: float = 370.0,
                      model: str = "llama3-8b", num_requests: int = 400, ttft_ms: float = 500.0, tpot_ms: float = 50.0,
                      seed: int = 0, sweep_rates_rps: tuple[float, ...] = ()) -> Experiment:
    """One what-if scenario for the simulator (notebook 03's knobs), both layouts on the same requests:

        result = run_experiment(whatif_experiment(rate_rps=12, num_prefill=1, num_decode=2, link_gbps=25),
                                progress=False, write=False)
        result.table  # TTFT/TPOT percentiles, goodput, SLO attainment of each layout

    A disaggregated xPyD layout against as many colocated instances (the same GPUs), each instance on one GPU
    of the roofline cost model, with the KV link at `link_gbps`; lognormal lengths around the medians, Poisson
    arrivals."""
    gpus = num_prefill + num_decode
    max_prompt = min(8 * prompt_median_tokens, 12288)
    max_output = min(8 * output_median_tokens, 4096)
    data = {
        "name": "whatif", "seed": seed, "model": {"name": model},
        "engine": {"max_num_seqs": 128, "max_num_batched_tokens": 4096, "max_model_len": max_prompt + max_output},
        "workload": {
            "num_requests": num_requests, "arrival": {"kind": "poisson", "rate_rps": rate_rps},
            "prompt_len": {"kind": "lognormal", "median_tokens": prompt_median_tokens, "sigma": 0.8,
                           "max_tokens": max_prompt},
            "output_len": {"kind": "lognormal", "median_tokens": output_median_tokens, "sigma": 0.8,
                           "max_tokens": max_output},
        },
        "runs": [
            {"name": f"{num_prefill}P{num_decode}D", "mode": "disaggregated", "num_prefill": num_prefill,
             "num_decode": num_decode, "backend": "sim", "link_bandwidth_gbps": link_gbps},
            {"name": f"{gpus}x-colocated", "mode": "colocated", "num_instances": gpus, "backend": "sim"},
        ],
        "slo": {"ttft_ms": ttft_ms, "tpot_ms": tpot_ms},
    }
    if sweep_rates_rps:
        data["sweep"] = {"rates_rps": list(sweep_rates_rps)}
    return parse_experiment(data, "whatif")
