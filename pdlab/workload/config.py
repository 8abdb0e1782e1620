"""The `workload` section of an experiment file: arrival processes and length distributions, tagged by `kind`.

`WorkloadSection.to_spec()` turns it into the runtime `WorkloadSpec` (reading the
trace file when a distribution uses it); `pdlab.experiment` validates it as part
of the whole file, and `python -m pdlab.placement` on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator

from pdlab.workload import arrivals, lengths, traces
from pdlab.workload.workload import WorkloadSpec
from pdlab.yaml_config import Section

if TYPE_CHECKING:
    import pandas as pd


# Arrival processes, tagged by `kind`.


class PoissonArrival(Section):
    kind: Literal["poisson"]
    rate_rps: PositiveFloat

    def build(self, trace: pd.DataFrame | None) -> arrivals.ArrivalProcess:
        return arrivals.PoissonArrivals(self.rate_rps)


class GammaArrival(Section):
    kind: Literal["gamma"]
    rate_rps: PositiveFloat
    cv: PositiveFloat = 1.0  # coefficient of variation of the gaps; > 1 is burstier than Poisson

    def build(self, trace: pd.DataFrame | None) -> arrivals.ArrivalProcess:
        return arrivals.GammaArrivals(self.rate_rps, self.cv)


class ConstantArrival(Section):
    kind: Literal["constant"]
    rate_rps: PositiveFloat

    def build(self, trace: pd.DataFrame | None) -> arrivals.ArrivalProcess:
        return arrivals.ConstantArrivals(self.rate_rps)


class BurstArrival(Section):
    kind: Literal["burst"]  # every request at time 0

    def build(self, trace: pd.DataFrame | None) -> arrivals.ArrivalProcess:
        return arrivals.BurstArrivals()


class TraceArrival(Section):
    kind: Literal["trace"]  # the first num_requests arrivals of workload.trace, in order
    rate_rps: PositiveFloat | None = None  # rescale the window to this mean rate; None keeps the trace's times

    def build(self, trace: pd.DataFrame | None) -> arrivals.ArrivalProcess:
        return traces.trace_arrivals(trace, self.rate_rps)


Arrival = Annotated[
    PoissonArrival | GammaArrival | ConstantArrival | BurstArrival | TraceArrival, Field(discriminator="kind")
]


# Length distributions, tagged by `kind`.


class _Bounded(Section):
    min_tokens: PositiveInt = 1
    max_tokens: PositiveInt | None = None

    @model_validator(mode="after")
    def _check_bounds(self):
        if self.max_tokens is not None and self.max_tokens < self.min_tokens:
            raise ValueError(f"max_tokens ({self.max_tokens}) must be >= min_tokens ({self.min_tokens})")
        return self

    @property
    def max_value(self) -> int | None:
        return self.max_tokens


class FixedLen(Section):
    kind: Literal["fixed"]
    tokens: PositiveInt

    def build(self, trace: pd.DataFrame | None, column: str) -> lengths.LengthDistribution:
        return lengths.FixedLength(self.tokens)

    @property
    def max_value(self) -> int:
        return self.tokens


class UniformLen(_Bounded):
    kind: Literal["uniform"]
    min_tokens: PositiveInt
    max_tokens: PositiveInt

    def build(self, trace: pd.DataFrame | None, column: str) -> lengths.LengthDistribution:
        return lengths.UniformLength(self.min_tokens, self.max_tokens)


class LognormalLen(_Bounded):
    """Give the center as `median_tokens` or `mean_tokens`, the spread as `sigma` or `p90_tokens`."""

    kind: Literal["lognormal"]
    median_tokens: PositiveFloat | None = None
    mean_tokens: PositiveFloat | None = None
    sigma: NonNegativeFloat | None = None
    p90_tokens: PositiveFloat | None = None

    @model_validator(mode="after")
    def _check_parameters(self):
        if (self.median_tokens is None) == (self.mean_tokens is None):
            raise ValueError("give exactly one of median_tokens and mean_tokens")
        if (self.sigma is None) == (self.p90_tokens is None):
            raise ValueError("give exactly one of sigma and p90_tokens")
        if self.p90_tokens is not None and (self.median_tokens is None or self.p90_tokens < self.median_tokens):
            raise ValueError("p90_tokens needs median_tokens, and must be >= it")
        return self

    def build(self, trace: pd.DataFrame | None, column: str) -> lengths.LengthDistribution:
        bounds = (self.min_tokens, self.max_tokens)
        if self.p90_tokens is not None:
            return lengths.LognormalLength.from_p90(self.median_tokens, self.p90_tokens, *bounds)
        if self.mean_tokens is not None:
            return lengths.LognormalLength.from_mean(self.mean_tokens, self.sigma, *bounds)
        return lengths.LognormalLength(self.median_tokens, self.sigma, *bounds)


class TraceLen(_Bounded):
    kind: Literal["trace"]  # this column of workload.trace
    replay: bool = False  # True: the first num_requests rows in order; False: drawn with replacement

    def build(self, trace: pd.DataFrame | None, column: str) -> lengths.LengthDistribution:
        return traces.trace_lengths(trace, column, self.replay, self.min_tokens, self.max_tokens)


Length = Annotated[FixedLen | UniformLen | LognormalLen | TraceLen, Field(discriminator="kind")]


class WorkloadSection(Section):
    num_requests: PositiveInt
    arrival: Arrival
    prompt_len: Length
    output_len: Length
    trace: Path | None = None  # a trace CSV (see pdlab.workload.traces), for kind: trace
    # Real user messages (sent through the chat template) for the first requests.
    text_prompts: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check_trace(self):
        users = [name for name in ("arrival", "prompt_len", "output_len") if getattr(self, name).kind == "trace"]
        if users and self.trace is None:
            raise ValueError(f"{users[0]} has kind 'trace' but no trace file is given (set workload.trace)")
        return self

    @property
    def max_request_tokens(self) -> int | None:
        """The most prompt + output tokens a synthetic request can need, when the config bounds it."""
        if self.prompt_len.max_value is None or self.output_len.max_value is None:
            return None
        return self.prompt_len.max_value + self.output_len.max_value

    def to_spec(self) -> WorkloadSpec:
        """The runtime workload; reads the trace file when a distribution uses it."""
        trace = traces.load_trace(self.trace) if self.trace is not None else None
        return WorkloadSpec(
            num_requests=self.num_requests,
            arrivals=self.arrival.build(trace),
            prompt_len=self.prompt_len.build(trace, "num_prompt_tokens"),
            output_len=self.output_len.build(trace, "num_output_tokens"),
            text_prompts=self.text_prompts,
        )
