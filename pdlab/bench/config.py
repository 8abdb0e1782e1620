"""What one benchmark run sends, where, and how fast: `BenchConfig`, and the flag syntax of lengths.

A length is written `512` (fixed), `fixed:512`, `uniform:128:1024` (both ends
included) or `lognormal:median=512,sigma=0.8,max=4096` (the center as
`median=` or `mean=`, the spread as `sigma=` or `p90=`, optional `min=` and
`max=`), the same distributions an experiment file names (`pdlab.workload.lengths`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pdlab.errors import ConfigError
from pdlab.workload.arrivals import (
    ArrivalProcess,
    BurstArrivals,
    ConstantArrivals,
    GammaArrivals,
    PoissonArrivals,
)
from pdlab.workload.lengths import FixedLength, LengthDistribution, LognormalLength, UniformLength

Endpoint = Literal["/v1/completions", "/v1/chat/completions"]
ENDPOINTS: tuple[str, ...] = ("/v1/completions", "/v1/chat/completions")
ArrivalKind = Literal["poisson", "gamma", "constant"]

# vLLM's random-dataset defaults (--random-input-len, --random-output-len).
DEFAULT_INPUT_LEN = 1024
DEFAULT_OUTPUT_LEN = 128

_LOGNORMAL_KEYS = ("median", "mean", "sigma", "p90", "min", "max")


def parse_length(text: str | int, flag: str = "length") -> LengthDistribution:
    """A length distribution from its flag syntax (see the module docstring); ConfigError naming `flag` if malformed."""
    if isinstance(text, int):
        return _build(flag, lambda: FixedLength(text))
    text = text.strip()
    kind, _, rest = text.partition(":")
    kind = kind.lower()
    try:
        if not rest and kind.isdigit():
            return FixedLength(int(kind))
        if kind == "fixed":
            return FixedLength(int(rest))
        if kind == "uniform":
            low, high = rest.split(":")
            return UniformLength(int(low), int(high))
        if kind == "lognormal":
            return _lognormal(rest)
    except ValueError as e:
        raise ConfigError(f"--{flag} {text!r}: {e}") from None
    raise ConfigError(
        f"--{flag} {text!r}: expected N, fixed:N, uniform:MIN:MAX or lognormal:median=M,sigma=S[,min=A][,max=B]"
    )


def _build(flag: str, make):
    try:
        return make()
    except ValueError as e:
        raise ConfigError(f"--{flag}: {e}") from None


def _lognormal(rest: str) -> LognormalLength:
    params: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in _LOGNORMAL_KEYS:
            raise ValueError(f"unknown lognormal parameter {item!r}; expected key=value with keys {_LOGNORMAL_KEYS}")
        params[key] = float(value)
    if ("median" in params) == ("mean" in params):
        raise ValueError("give exactly one of median= and mean=")
    if ("sigma" in params) == ("p90" in params):
        raise ValueError("give exactly one of sigma= and p90=")
    bounds = (int(params.get("min", 1)), None if "max" not in params else int(params["max"]))
    if "p90" in params:
        if "median" not in params:
            raise ValueError("p90= needs median=")
        return LognormalLength.from_p90(params["median"], params["p90"], *bounds)
    if "mean" in params:
        return LognormalLength.from_mean(params["mean"], params["sigma"], *bounds)
    return LognormalLength(params["median"], params["sigma"], *bounds)


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. Lengths may be given as flag strings or ints; they become distributions.

    Arrivals: `request_rate_rps` (inf sends every request at once) with
    `arrival` poisson, gamma (coefficient of variation `cv`; cv = 1 is
    Poisson) or constant; or, with `trace_arrivals`, the trace's own times
    (scaled to `request_rate_rps` when it is finite). `max_concurrency` caps
    the requests in flight (a closed loop when the rate is inf).
    """

    # --- where
    base_url: str = "http://127.0.0.1:8000"
    endpoint: Endpoint = "/v1/completions"
    model: str | None = None  # None: the first model GET /v1/models lists
    # --- what
    num_prompts: int = 100
    input_len: LengthDistribution | str | int | None = None  # None: the trace's column, else DEFAULT_INPUT_LEN
    output_len: LengthDistribution | str | int | None = None
    trace: Path | None = None  # an Azure-format trace CSV (pdlab.workload.traces): lengths, replayed row by row
    trace_max_input_len: int | None = None  # clip trace prompt lengths (a small model's context)
    trace_max_output_len: int | None = None
    seed: int = 0
    tokenizer: str | None = None  # a pdlab model name or path; None: the served model if pdlab resolves it; "none": words
    prompt_token_ids: bool = False  # send token id lists as the prompt (completions; needs a tokenizer)
    # --- when
    request_rate_rps: float = math.inf
    arrival: ArrivalKind = "poisson"
    cv: float = 1.0
    trace_arrivals: bool = False
    max_concurrency: int | None = None
    # --- how
    ignore_eos: bool = True
    temperature: float | None = None  # None: not sent (the server's default)
    extra_body: dict = field(default_factory=dict)  # merged into every request body
    continuous_usage: bool = False  # ask for usage in every chunk (vLLM's continuous_usage_stats)
    timeout_s: float = 600.0  # per request, from send to [DONE]
    ready_timeout_s: float = 0.0  # keep asking GET /v1/models this long before giving up
    # --- judging and reporting
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    label: str = "bench"  # the records' `mode` column
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("input_len", "output_len"):
            value = getattr(self, name)
            if isinstance(value, str | int):
                object.__setattr__(self, name, parse_length(value, name.replace("_", "-")))
        if self.trace is not None:
            object.__setattr__(self, "trace", Path(self.trace))
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))
        self._validate()

    def _validate(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise ConfigError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base_url must start with http:// or https://, got {self.base_url!r}")
        if self.num_prompts < 1:
            raise ConfigError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if not self.request_rate_rps > 0:
            raise ConfigError(f"request_rate must be > 0 (inf sends all at once), got {self.request_rate_rps}")
        if self.arrival not in ("poisson", "gamma", "constant"):
            raise ConfigError(f"arrival must be poisson, gamma or constant, got {self.arrival!r}")
        if not self.cv > 0:
            raise ConfigError(f"cv must be > 0, got {self.cv}")
        if self.arrival != "gamma" and self.cv != 1.0:
            raise ConfigError(f"cv (burstiness) applies to gamma arrivals, not {self.arrival}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ConfigError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.trace_arrivals and self.trace is None:
            raise ConfigError("trace_arrivals needs a trace")
        if self.prompt_token_ids and self.endpoint != "/v1/completions":
            raise ConfigError("token-id prompts need the /v1/completions endpoint")
        if self.prompt_token_ids and self.tokenizer is not None and self.tokenizer.lower() == "none":
            raise ConfigError("token-id prompts need a tokenizer (its vocabulary)")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0, got {self.timeout_s}")
        for name in ("slo_ttft_ms", "slo_tpot_ms"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value}")

    @property
    def url(self) -> str:
        return self.base_url + self.endpoint

    @property
    def slo_ttft_s(self) -> float | None:
        return None if self.slo_ttft_ms is None else self.slo_ttft_ms / 1e3

    @property
    def slo_tpot_s(self) -> float | None:
        return None if self.slo_tpot_ms is None else self.slo_tpot_ms / 1e3

    def arrival_process(self) -> ArrivalProcess:
        """The rate-driven arrivals (trace arrivals are built from the loaded trace instead)."""
        if math.isinf(self.request_rate_rps):
            return BurstArrivals()
        if self.arrival == "constant":
            return ConstantArrivals(self.request_rate_rps)
        if self.arrival == "gamma":
            return GammaArrivals(self.request_rate_rps, self.cv)
        return PoissonArrivals(self.request_rate_rps)

    def describe(self) -> dict:
        """JSON-ready settings (distributions by their repr)."""
        out = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, float) and math.isinf(value):
                value = "inf"
            elif value is not None and not isinstance(value, str | int | float | bool | dict):
                value = repr(value) if not isinstance(value, Path) else str(value)
            out[name] = value
        return out
