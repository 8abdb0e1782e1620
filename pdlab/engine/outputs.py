"""What the engine reports about a request: tokens, text, finish reason and timestamps."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None
    arrival_time_s: float
    first_token_time_s: float | None
    token_times_s: list[float] = field(default_factory=list)
    finish_time_s: float | None = None
    num_preemptions: int = 0
    error: str | None = None
    # Per output token, {token id: log-probability} (top-k and the sampled one) when asked.
    logprobs: list[dict[int, float]] | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time_s is None else self.first_token_time_s - self.arrival_time_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        if len(self.token_times_s) < 2:
            return None
        return (self.token_times_s[-1] - self.token_times_s[0]) / (len(self.token_times_s) - 1)

    @property
    def itl_s(self) -> list[float]:
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def e2e_s(self) -> float | None:
        return None if self.finish_time_s is None else self.finish_time_s - self.arrival_time_s
