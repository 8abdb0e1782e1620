"""Run a benchmark: send the workload at its arrival times, gather records and the summary.

`run_benchmark(config) -> (records, summary)` is the whole job. Requests are
sent at their scheduled times by one dispatch loop (open loop: a slow server
does not slow the sender); with `max_concurrency` each request also waits for
a free slot first, as vLLM's `--max-concurrency` does. Each request's
`arrival_s` is when it was actually sent, so its TTFT is what the server made
it wait, not the client's queue (vLLM measures the same); the summary's
`send_lag_max_ms` shows how late the sends came against the schedule (client
lag in an open loop, the slot wait in a closed one).

Times in records are seconds from the start of the run (the first send).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence

import httpx
import numpy as np
from tqdm.auto import tqdm

from pdlab.bench.client import StreamResult, list_models, request_body, stream_request
from pdlab.bench.config import DEFAULT_INPUT_LEN, DEFAULT_OUTPUT_LEN, BenchConfig
from pdlab.bench.prompts import BenchRequest, build_requests
from pdlab.errors import ConfigError, PdlabError
from pdlab.metrics.records import RequestRecord
from pdlab.metrics.summary import summarize
from pdlab.workload.lengths import FixedLength
from pdlab.workload.workload import WorkloadSpec


def run_benchmark(config: BenchConfig) -> tuple[list[RequestRecord], dict]:
    """Run `config` to the end; return one record per request (in arrival order) and the summary.

    Raises `PdlabError` for a bad config or an endpoint that lists no model
    (when `config.model` is None); request failures become records instead.
    Must not be called from a running event loop: await `async_run_benchmark` there.
    """
    return asyncio.run(async_run_benchmark(config))


async def async_run_benchmark(config: BenchConfig) -> tuple[list[RequestRecord], dict]:
    spec = workload_spec(config)  # a bad trace fails before the server is asked anything
    limits = httpx.Limits(max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency)
    # The client's own timeouts are looser than the per-request one, which is the one that fires.
    timeout = httpx.Timeout(config.timeout_s + 5.0, connect=min(30.0, config.timeout_s + 5.0))
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        model = config.model or await discover_model(client, config)
        tokenizer = load_tokenizer(config.tokenizer, model)
        if config.prompt_token_ids and tokenizer is None:
            raise ConfigError(f"token-id prompts need a tokenizer and pdlab cannot resolve {model!r}: pass --tokenizer")
        requests = build_requests(spec, config.seed, tokenizer, config.prompt_token_ids)
        results, wall_s, max_in_flight = await _dispatch(client, config, model, requests)
    start_s = min(r.send_s for r in results)
    records = [to_record(req, res, start_s, config.label) for req, res in zip(requests, results, strict=True)]
    summary = summarize(records, config.slo_ttft_s, config.slo_tpot_s)
    lags_s = [res.send_s - start_s - req.spec.arrival_s for req, res in zip(requests, results, strict=True)]
    summary.update(
        model=model,
        wall_duration_s=wall_s,
        send_lag_max_ms=max(lags_s) * 1e3,
        max_in_flight=max_in_flight,
        prompts=prompt_source(config, model, tokenizer),
    )
    return records, summary


async def discover_model(client: httpx.AsyncClient, config: BenchConfig) -> str:
    try:
        models = await list_models(client, config.base_url, config.ready_timeout_s)
    except (httpx.HTTPError, ValueError) as e:
        raise PdlabError(f"cannot list the models at {config.base_url}/v1/models ({e}); is the server up?") from None
    if not models:
        raise PdlabError(f"{config.base_url}/v1/models lists no model; pass --model")
    return models[0]


def load_tokenizer(name: str | None, served_model: str):
    """The tokenizer that builds prompts: `name`, else the served model's if pdlab resolves it, else None (words).

    An explicit `name` that does not resolve raises; "none" means words.
    """
    from pdlab.models.source import resolve_model

    if name is not None and name.lower() == "none":
        return None
    if name is not None:
        return resolve_model(name).load_tokenizer()
    try:
        return resolve_model(served_model).load_tokenizer()
    except (PdlabError, OSError, ImportError, ValueError):  # not a model pdlab can read here: word prompts
        return None


def prompt_source(config: BenchConfig, model: str, tokenizer) -> str:
    """How the prompts were made, for the summary."""
    if tokenizer is None:
        return "words (approximate lengths)"
    kind = "token ids" if config.prompt_token_ids else "text"
    return f"{kind}, tokenizer {config.tokenizer or model}"


def workload_spec(config: BenchConfig) -> WorkloadSpec:
    """The run's arrivals and lengths; reads the trace when one is given."""
    from pdlab.workload.traces import load_trace, trace_arrivals, trace_lengths

    trace = load_trace(config.trace) if config.trace is not None else None
    if trace is not None and config.num_prompts > len(trace):
        raise ConfigError(f"{config.trace} has {len(trace)} rows, fewer than the {config.num_prompts} prompts asked for")
    input_len, output_len = config.input_len, config.output_len
    if trace is not None:
        # Rows replayed in order keep each request's prompt and output lengths together.
        if input_len is None:
            input_len = trace_lengths(trace, "num_prompt_tokens", True, max_tokens=config.trace_max_input_len)
        if output_len is None:
            output_len = trace_lengths(trace, "num_output_tokens", True, max_tokens=config.trace_max_output_len)
    if config.trace_arrivals:
        rate = None if math.isinf(config.request_rate_rps) else config.request_rate_rps
        arrivals = trace_arrivals(trace, rate)
    else:
        arrivals = config.arrival_process()
    return WorkloadSpec(
        num_requests=config.num_prompts,
        arrivals=arrivals,
        prompt_len=FixedLength(DEFAULT_INPUT_LEN) if input_len is None else input_len,
        output_len=FixedLength(DEFAULT_OUTPUT_LEN) if output_len is None else output_len,
    )


async def _dispatch(
    client: httpx.AsyncClient, config: BenchConfig, model: str, requests: Sequence[BenchRequest]
) -> tuple[list[StreamResult], float, int]:
    """Send every request at its arrival time; return their results (same order), the wall time and peak in flight."""
    slots = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    in_flight = 0
    max_in_flight = 0

    async def send(request: BenchRequest) -> StreamResult:
        nonlocal in_flight, max_in_flight
        body = request_body(
            config.endpoint, model, request.prompt, request.spec.max_tokens, ignore_eos=config.ignore_eos,
            temperature=config.temperature, continuous_usage=config.continuous_usage, extra_body=config.extra_body,
        )
        if slots is not None:
            await slots.acquire()
        in_flight += 1
        max_in_flight = max(max_in_flight, in_flight)
        try:
            return await stream_request(client, config.url, body, config.timeout_s)
        finally:
            in_flight -= 1
            if slots is not None:
                slots.release()
            bar.update(1)

    tasks = []
    with tqdm(total=len(requests), desc=config.label, unit="req", disable=not config.progress) as bar:
        start_s = time.perf_counter()
        for request in requests:
            delay_s = start_s + request.spec.arrival_s - time.perf_counter()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            tasks.append(asyncio.create_task(send(request)))
        results = await asyncio.gather(*tasks)
        wall_s = time.perf_counter() - start_s
    return list(results), wall_s, max_in_flight


def to_record(request: BenchRequest, result: StreamResult, start_s: float, label: str) -> RequestRecord:
    """The record of one request; times relative to `start_s`. Failed requests keep the times seen."""
    def rel(t: float | None) -> float | None:
        return None if t is None else t - start_s

    chunks = result.chunk_times_s
    num_output_tokens = result.completion_tokens if result.completion_tokens is not None else len(chunks)
    times = token_times(chunks, num_output_tokens, result.chunk_token_counts) if chunks else []
    return RequestRecord(
        request_id=request.request_id,
        backend="real",
        mode=label,
        arrival_s=result.send_s - start_s,
        first_token_s=rel(chunks[0]) if chunks else None,
        finish_s=rel(result.done_s),
        num_prompt_tokens=result.prompt_tokens if result.prompt_tokens is not None else request.num_prompt_tokens,
        num_output_tokens=num_output_tokens,
        finish_reason="error" if result.error is not None else result.finish_reason,
        token_times_s=tuple(t - start_s for t in times),
        error=result.error,
    )


def token_times(chunk_times_s: Sequence[float], num_tokens: int, cumulative_counts: Sequence[int] | None = None
                ) -> list[float]:
    """One time per output token from the times of the chunks that carried them.

    A chunk may carry several tokens (a server that batches its writes,
    speculative decoding). Its tokens are spread evenly over the gap since the
    previous chunk, as SGLang's benchmark does (each gets ITL gap/k), so the
    ITLs stay token-weighted and sum to the decode time; the first chunk's
    tokens all get the first chunk's time (the TTFT). Which chunk carried how
    many tokens is known when the server reports cumulative usage per chunk;
    otherwise the first chunk is taken to carry one token and the rest to
    share the others equally. With one token per chunk (the usual case) the
    times are the chunk times. vLLM's benchmark instead records one ITL per
    chunk, which overstates ITL when chunks carry several tokens.
    """
    if num_tokens <= 0 or not chunk_times_s:
        return []
    if num_tokens == 1:
        return [float(chunk_times_s[0])]
    if cumulative_counts is not None and len(cumulative_counts) == len(chunk_times_s) and cumulative_counts[-1] > 0:
        positions = np.maximum.accumulate(np.asarray(cumulative_counts, dtype=np.float64))
    elif len(chunk_times_s) == 1:
        positions = np.asarray([num_tokens], dtype=np.float64)
    else:
        positions = np.linspace(1.0, num_tokens, len(chunk_times_s))
    # Token i (1-based) reached the client when the cumulative count reached i.
    times = np.interp(np.arange(1, num_tokens + 1, dtype=np.float64), positions, np.asarray(chunk_times_s))
    return times.tolist()
