"""The scheduler's view of one request: its tokens, its KV blocks, its state.

Standard library only. Times are plain floats supplied by the driver (wall
clock in the real engine, simulated time in the simulator): the policy never
reads a clock itself.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal

from pdlab.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued for (re)computation here
    RUNNING = "running"
    RESERVING = "reserving"  # decode side: waiting for blocks to receive a remote prefill's KV
    TRANSFERRING = "transferring"  # decode side: blocks reserved, KV on its way
    FINISHED = "finished"


FinishReason = str  # "stop" (eos, stop token or stop string), "length", "abort", "error"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time_s: float = 0.0
    eos_token_ids: tuple[int, ...] = ()  # any of them ends the request (unless ignore_eos)
    # Seed of this request's sampling stream (SamplingParams.seed, or one the engine drew).
    seed: int = 0

    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    # Tokens whose KV is already in this request's blocks.
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    # When the request finishes, keep its blocks until `Scheduler.release`: a
    # KV transfer may still read them (prefill side) or write them (decode side).
    keep_blocks_after_finish: bool = False

    first_token_time_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)  # one per output token
    finish_time_s: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list (a decode step wants one token)."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p: end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def phase(self) -> Literal["prefill", "decode"]:
        """'prefill' while known tokens are uncomputed beyond the last one, else 'decode'."""
        return "prefill" if self.num_uncomputed_tokens > 1 or self.num_output_tokens == 0 else "decode"
