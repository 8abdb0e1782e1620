"""What completions and chat completions share: check a request, send it, answer whole or as a stream.

A request's life here: check the model and the role, encode the prompt (the
subclass), turn the body into `SamplingParams` checked against the
instance's context (`max_model_len` from its Pong), open a `RequestStream`,
wait for its first update (errors before the first token get a proper HTTP
status), then either collect the rest into one response or stream chunks as
server-sent events. A client that goes away aborts its request on the
instance, whenever that happens, so its KV blocks are freed on both
instances of a disaggregated pair.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from pdlab.cluster.messages import QUEUE_FULL, RequestUpdate, sampling_to_msg
from pdlab.entrypoints.openai.detokenizer import IncrementalDetokenizer
from pdlab.entrypoints.openai.engine_client import EngineClient, EngineUnavailable, RequestStream
from pdlab.entrypoints.openai.errors import APIError, invalid_request
from pdlab.entrypoints.openai.protocol import SamplingFields, UsageInfo
from pdlab.errors import InvalidRequestError
from pdlab.models.tokenizer import TokenizerLike
from pdlab.sampling_params import SamplingParams

log = logging.getLogger("pdlab.api_server")

# Messages of the instance's own request checks (`LLMEngine.make_request`, `SamplingParams`):
# the request was at fault. Anything else it reports (a prefill lost, a transfer failed) is ours.
_REQUEST_FAULTS = ("invalid sampling parameter", "the prompt", "prompt token ids", "request id")


@dataclass(frozen=True)
class EngineInfo:
    """What the API server learnt about its instance at start-up."""

    model_name: str  # the served name: the --model string
    role: str
    max_model_len: int
    vocab_size: int
    routed: bool = False  # the splitwise scheduler routes requests: any role's server takes them


@dataclass
class Generation:
    """One request as the client sees it: its id, prompt, and what has come back so far."""

    request_id: str
    num_prompt_tokens: int
    params: SamplingParams
    include_usage: bool = False
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)

    def usage(self) -> UsageInfo:
        return UsageInfo.of(self.num_prompt_tokens, len(self.token_ids))


class ClientDisconnected(Exception):
    pass


class OpenAIServing:
    """The shared flow; subclasses say how to build the prompt and how responses look."""

    id_prefix = "cmpl"
    prompt_param = "prompt"

    def __init__(self, info: EngineInfo, tokenizer: TokenizerLike, client: EngineClient) -> None:
        self.info = info
        self.tokenizer = tokenizer
        self.client = client

    # --- what a subclass provides ------------------------------------------------------

    def encode(self, body) -> list[int]:
        raise NotImplementedError

    def max_tokens(self, body) -> tuple[str, int | None, int | None]:
        """(the field's name, the value asked for or None, the default when None: None means the whole context)."""
        raise NotImplementedError

    def num_logprobs(self, body) -> int | None:
        return None

    def response(self, gen: Generation, text: str, finish_reason: str | None) -> BaseModel:
        raise NotImplementedError

    def opening_chunk(self, gen: Generation) -> BaseModel | None:
        """What a stream starts with before any text (chat: the role), if anything."""
        return None

    def chunk(self, gen: Generation, text: str, finish_reason: str | None, logprobs: list[dict[int, float]]
              ) -> BaseModel:
        """One streamed piece: new text, the log-probabilities of the tokens that came with it, the finish reason."""
        raise NotImplementedError

    def usage_chunk(self, gen: Generation) -> BaseModel:
        raise NotImplementedError

    # --- the flow ------------------------------------------------------------------------

    async def serve(self, body: SamplingFields, raw: Request) -> Response:
        self._check_model(body.model)
        if self.info.role == "prefill" and not self.info.routed:
            raise APIError(400, "this is a prefill instance (--splitwise-role prefill); send completions to the decode "
                                "instance's --port, which reaches this one through --innode-prefill-ports",
                           code="wrong_instance_role")
        prompt_ids = self.encode(body)
        params = self._sampling_params(body, prompt_ids)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        gen = Generation(f"{self.id_prefix}-{uuid.uuid4().hex}", len(prompt_ids), params, include_usage)
        try:
            stream = self.client.open(gen.request_id, prompt_ids, sampling_to_msg(params))
        except EngineUnavailable as e:
            raise _unavailable(e) from None
        streaming = False
        try:
            if body.stream:
                first = await _until_disconnected(raw, stream.next())
                self._raise_if_failed(first)
                streaming = True
                return _EventStream(self._events(gen, stream, first), on_close=lambda: self._close(stream))
            final = await _until_disconnected(raw, self._collect(gen, stream))
            self._raise_if_failed(final)
            reply = self.response(gen, final.text or "", final.finish_reason)
            return Response(reply.model_dump_json(), media_type="application/json")
        except EngineUnavailable as e:
            raise _unavailable(e) from None
        except ClientDisconnected:
            return Response(status_code=499)  # nobody is listening; the request is aborted below
        finally:
            if not streaming:
                self._close(stream)

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.info.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.info.model_name!r}",
                           param="model", code="model_not_found")

    def _sampling_params(self, body: SamplingFields, prompt_ids: list[int]) -> SamplingParams:
        num_prompt, max_len = len(prompt_ids), self.info.max_model_len
        if any(not 0 <= t < self.info.vocab_size for t in prompt_ids):
            raise APIError(400, f"prompt token ids must be integers in [0, {self.info.vocab_size})",
                           param=self.prompt_param)
        room = max_len - num_prompt
        if room <= 0:
            raise APIError(400, f"the prompt has {num_prompt} tokens; this model's context (max_model_len) is "
                                f"{max_len}, so prompts may have at most {max_len - 1} tokens",
                           param=self.prompt_param, code="context_length_exceeded")
        name, max_tokens, default = self.max_tokens(body)
        if max_tokens is None:
            max_tokens = room if default is None else min(default, room)
        elif isinstance(max_tokens, int) and max_tokens > room:
            raise APIError(400, f"{name}={max_tokens} is too large: the prompt has {num_prompt} tokens and this model's "
                                f"context (max_model_len) is {max_len}, so {name} may be at most {room}",
                           param=name, code="context_length_exceeded")
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=0 if body.top_k in (None, -1) else body.top_k,
                seed=body.seed, stop=tuple(body.stop), stop_token_ids=tuple(body.stop_token_ids),
                ignore_eos=body.ignore_eos, logprobs=self.num_logprobs(body),
            )
        except InvalidRequestError as e:
            raise invalid_request(e) from None

    async def _collect(self, gen: Generation, stream: RequestStream) -> RequestUpdate:
        while True:
            update = await stream.next()
            self._record(gen, update)
            if update.finished:
                return update

    async def _events(self, gen: Generation, stream: RequestStream, first: RequestUpdate) -> AsyncIterator[str]:
        """Server-sent events: the chunks, the usage if asked, then `[DONE]`."""
        detok = IncrementalDetokenizer(self.tokenizer, gen.params.stop)
        opening = self.opening_chunk(gen)
        if opening is not None:
            yield _sse(opening)
        update = first
        while True:
            self._record(gen, update)
            logprobs = list(update.logprobs or [])
            if update.finished:
                if update.error:
                    yield _sse(_instance_error(update.error).body())
                    break
                yield _sse(self.chunk(gen, detok.finish(update.text or ""), update.finish_reason, logprobs))
                if gen.include_usage:
                    yield _sse(self.usage_chunk(gen))
                break
            delta = detok.add(update.new_token_ids)
            if delta or logprobs:
                yield _sse(self.chunk(gen, delta, None, logprobs))
            try:
                update = await stream.next()
            except EngineUnavailable as e:
                yield _sse(_unavailable(e).body())
                break
        yield "data: [DONE]\n\n"

    def token_text(self, token_id: int) -> str:
        """One token's text, special tokens included (for log-probabilities)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _record(self, gen: Generation, update: RequestUpdate) -> None:
        gen.token_ids.extend(update.new_token_ids)
        if update.logprobs:
            gen.logprobs.extend(update.logprobs)

    def _raise_if_failed(self, update: RequestUpdate) -> None:
        if update.finished and (update.error or update.finish_reason == "error"):
            raise _instance_error(update.error or "the instance failed the request")

    def _close(self, stream: RequestStream) -> None:
        if stream.close():
            log.info("%s: the client went away; aborted it on the instance", stream.request_id)


class _EventStream(StreamingResponse):
    """Server-sent events that run `on_close` however the response ends (done, failed, disconnected)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def top_logprobs(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    """The `k` most likely tokens of one position's entry (the instance adds the sampled token to its top k)."""
    return sorted(entry.items(), key=lambda item: -item[1])[:k]


def _sse(model: BaseModel) -> str:
    return f"data: {model.model_dump_json()}\n\n"


async def _until_disconnected(raw: Request, awaitable):
    """Await `awaitable`, unless the client disconnects first (then raise `ClientDisconnected`)."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnect(raw))
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, watch):
            if not task.done():
                task.cancel()
    if work in done:
        return work.result()
    raise ClientDisconnected


async def _disconnect(raw: Request) -> None:
    # The body has been read: the next message the server sends is the disconnect.
    while (await raw.receive())["type"] != "http.disconnect":
        pass


QUEUE_FULL_RETRY_AFTER_S = 1


def _instance_error(message: str) -> APIError:
    if message.startswith(_REQUEST_FAULTS):
        return invalid_request(InvalidRequestError(message))
    if message.startswith(QUEUE_FULL):  # overloaded, as OpenAI answers it: try again later
        return APIError(503, f"the engine is overloaded: {message}", code="queue_full",
                        headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)})
    return APIError(503, f"the engine could not serve the request: {message}", code="engine_error")


def _unavailable(e: EngineUnavailable) -> APIError:
    return APIError(503, f"the engine instance is unavailable: {e}", code="engine_unavailable")
