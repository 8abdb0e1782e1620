"""One streamed request to an OpenAI-compatible endpoint, timed at the client.

`stream_request` posts a body with `stream: true` and reads the server-sent
events (`data: {...}` lines, `:` comments, `data: [DONE]` at the end). It
never raises: an HTTP error status, a refused connection, a broken stream, an
`error` event or the per-request timeout all come back as a `StreamResult`
with `error` set, holding whatever times were seen before.

What is timed (`time.perf_counter`, absolute; the runner makes it relative):

- `send_s`: just before the request is written;
- `chunk_times_s`: each chunk whose text (completions) or `delta.content`
  (chat) is non-empty. The first is the first token (the role-only chunk chat
  servers open with does not count). If a stream has only empty-text chunks,
  their times are used instead, as vLLM does;
- `done_s`: when `data: [DONE]` arrives (the end of the request).

Token counts come from the `usage` object (`stream_options.include_usage`):
`completion_tokens` for the output, `prompt_tokens` for the prompt. When the
server also puts usage in content chunks (vLLM's `continuous_usage_stats`),
`chunk_token_counts` holds the cumulative completion tokens at each timed chunk.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx

MAX_ERROR_CHARS = 500


@dataclass
class StreamResult:
    send_s: float
    chunk_times_s: list[float] = field(default_factory=list)
    chunk_token_counts: list[int] | None = None  # cumulative, one per chunk time, when the server reports it
    done_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    text: str = ""
    error: str | None = None
    end_s: float | None = None  # when the client stopped reading (success or not)


def request_body(
    endpoint: str,
    model: str,
    prompt: str | list[int],
    max_tokens: int,
    *,
    ignore_eos: bool = True,
    temperature: float | None = None,
    continuous_usage: bool = False,
    extra_body: dict | None = None,
) -> dict:
    """The JSON body for a streamed completion or chat completion."""
    stream_options: dict = {"include_usage": True}
    if continuous_usage:
        stream_options["continuous_usage_stats"] = True
    body: dict = {"model": model, "max_tokens": max_tokens, "stream": True, "stream_options": stream_options}
    if endpoint.endswith("/chat/completions"):
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM and pdlab extension: always generate max_tokens tokens
    if temperature is not None:
        body["temperature"] = temperature
    body.update(extra_body or {})
    return body


async def stream_request(client: httpx.AsyncClient, url: str, body: dict, timeout_s: float) -> StreamResult:
    """Post `body` to `url` and time its stream; never raises (see the module docstring)."""
    result = StreamResult(send_s=time.perf_counter())
    chat = url.rstrip("/").endswith("/chat/completions")
    try:
        await asyncio.wait_for(_read_stream(client, url, body, chat, result), timeout_s)
    except asyncio.TimeoutError:
        result.error = f"timeout: no [DONE] within {timeout_s:g} s"
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    except Exception as e:  # noqa: BLE001 -- a benchmark reports every failure as a record, whatever it is
        result.error = f"{type(e).__name__}: {e}"
    result.end_s = time.perf_counter()
    if result.error is None and result.done_s is None:
        result.error = "the stream ended without data: [DONE]"
    if result.error is None and not result.chunk_times_s:
        result.error = "the stream carried no output"
    if result.error is None and result.finish_reason in ("abort", "error"):
        result.error = f"finish_reason {result.finish_reason}"
    if result.error is not None:
        result.error = result.error[:MAX_ERROR_CHARS]
    return result


async def _read_stream(client: httpx.AsyncClient, url: str, body: dict, chat: bool, result: StreamResult) -> None:
    empty_chunk_times: list[float] = []  # chunks of empty text: the fallback when no chunk has text
    counts: list[int] = []
    async with client.stream("POST", url, json=body) as response:
        if response.status_code >= 400:
            raw = await response.aread()
            result.error = f"HTTP {response.status_code}: {_error_message(raw)}"
            return
        async for data in _sse_data(response):
            now = time.perf_counter()
            if data == "[DONE]":
                result.done_s = now
                break
            event = json.loads(data)
            if not isinstance(event, dict):
                raise TypeError(f"unexpected event {data[:100]!r}")
            if event.get("error") is not None or event.get("object") == "error":
                result.error = f"error event: {_error_message(data.encode())}"
                return
            usage = event.get("usage")
            if usage:
                result.completion_tokens = usage.get("completion_tokens", result.completion_tokens)
                result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens)
            choices = event.get("choices") or []
            if not choices:
                continue
            choice = choices[0]
            text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            if text:
                result.chunk_times_s.append(now)
                result.text += text
                if usage and usage.get("completion_tokens") is not None:
                    counts.append(int(usage["completion_tokens"]))
            else:
                empty_chunk_times.append(now)
            if choice.get("finish_reason") is not None:
                result.finish_reason = choice["finish_reason"]
    if not result.chunk_times_s:
        result.chunk_times_s = empty_chunk_times
    elif counts and len(counts) == len(result.chunk_times_s):
        result.chunk_token_counts = counts


async def _sse_data(response: httpx.Response):
    """Yield the data of each server-sent event (several `data:` lines join with newlines)."""
    lines: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if lines:
                yield "\n".join(lines)
                lines = []
            continue
        if line.startswith(":"):
            continue  # a comment (keep-alive ping)
        name, _, value = line.partition(":")
        if name == "data":
            lines.append(value.removeprefix(" "))
    if lines:
        yield "\n".join(lines)


def _error_message(raw: bytes) -> str:
    """The message of an OpenAI-style error body ({"error": {"message"}}, {"message"} or {"detail"}), else the body."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        payload = json.loads(text)
    except ValueError:
        return text[:MAX_ERROR_CHARS]
    if isinstance(payload, dict):
        inner = payload.get("error", payload)
        if isinstance(inner, dict):
            for key in ("message", "detail"):
                if inner.get(key):
                    return str(inner[key])[:MAX_ERROR_CHARS]
        elif isinstance(inner, str):
            return inner[:MAX_ERROR_CHARS]
    return text[:MAX_ERROR_CHARS]


async def list_models(client: httpx.AsyncClient, base_url: str, ready_timeout_s: float = 0.0) -> list[str]:
    """The model ids GET /v1/models lists; retried for `ready_timeout_s` while the server is not up.

    Raises `httpx.HTTPError` after the last try, ValueError for an answer without a model list.
    """
    deadline = time.monotonic() + ready_timeout_s
    while True:
        try:
            response = await client.get(f"{base_url}/v1/models", timeout=10.0)
            response.raise_for_status()
            break
        except httpx.HTTPError:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(0.5)
    payload = response.json()
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        raise ValueError(  # noqa: TRY004 -- a bad answer, not a bad argument
            f"GET {base_url}/v1/models: no 'data' list in {response.text[:200]!r}"
        )
    return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]
