"""Replay a workload against a live engine in real time (open loop).

Each request is added when its arrival time comes, whatever the engine is
doing; its latencies count from that intended arrival, so queueing behind a
busy engine shows in TTFT as it would for a real client.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from tqdm.auto import tqdm

from pdlab.engine.outputs import RequestOutput
from pdlab.metrics.records import RequestRecord
from pdlab.sampling_params import SamplingParams
from pdlab.workload.workload import RequestSpec


class Engine(Protocol):
    """What the replay needs of an engine (the colocated `LLMEngine`, or a disaggregated pair's entry point)."""

    clock: Callable[[], float]

    def add_request(self, prompt: list[int], params: SamplingParams, request_id: str, arrival_time_s: float): ...

    def step(self) -> list[RequestOutput]: ...

    def has_unfinished(self) -> bool: ...


def replay(
    engine: Engine,
    requests: Sequence[RequestSpec],
    params_for: Callable[[RequestSpec], SamplingParams],
    mode: str,
    progress: bool = True,
    idle_sleep_s: float = 0.0005,
    desc: str | None = None,
) -> tuple[list[RequestRecord], dict[str, RequestOutput]]:
    """Serve `requests` at their arrival times; return their records and final outputs."""
    pending = deque(sorted(requests, key=lambda r: r.arrival_s))
    outputs: dict[str, RequestOutput] = {}
    start_s = engine.clock()
    with tqdm(total=len(requests), desc=desc or mode, disable=not progress, unit="req") as bar:
        while pending or engine.has_unfinished():
            now_s = engine.clock() - start_s
            while pending and pending[0].arrival_s <= now_s:
                spec = pending.popleft()
                engine.add_request(list(spec.prompt_token_ids), params_for(spec), spec.request_id, start_s + spec.arrival_s)
            if engine.has_unfinished():
                for out in engine.step():
                    if out.finished:
                        outputs[out.request_id] = out
                        bar.update(1)
            elif pending:
                time.sleep(min(max(0.0, pending[0].arrival_s - (engine.clock() - start_s)), 0.05) or idle_sleep_s)
    records = [to_record(outputs[spec.request_id], start_s, mode) for spec in requests]
    return records, outputs


def to_record(out: RequestOutput, start_s: float, mode: str, backend: str = "real") -> RequestRecord:
    rel = lambda t: None if t is None else t - start_s  # noqa: E731
    return RequestRecord(
        request_id=out.request_id,
        backend=backend,
        mode=mode,
        arrival_s=out.arrival_time_s - start_s,
        first_token_s=rel(out.first_token_time_s),
        finish_s=rel(out.finish_time_s),
        num_prompt_tokens=len(out.prompt_token_ids),
        num_output_tokens=len(out.token_ids),
        finish_reason=out.finish_reason,
        token_times_s=tuple(t - start_s for t in out.token_times_s),
        error=out.error,
    )
