"""Request and response bodies of the OpenAI API, as pydantic models.

Requests reject unknown fields (a misspelt `max_token` is an error, not a
silent default) and fields pdlab does not implement when they would change
the output (`n > 1`, penalties, `echo`, tools); fields that change nothing
(`user`, `metadata`, a zero penalty) are accepted. Each validator's message
becomes the `message` of a 400 error naming the field.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

INT64 = 2**63


def _unicode(value: str) -> str:
    """JSON lets `\\ud800` through, a lone surrogate: not Unicode, and no tokenizer or encoder takes it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"must be valid Unicode: a lone surrogate {value[e.start]!r} at position {e.start}") from None
    return value


def _prompt(value: Any) -> str | list[int]:
    """A string, a list of token ids, or a list holding one string or one list of ids."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]  # the batch form with one prompt
    if isinstance(value, str):
        if not value:
            raise ValueError("must not be empty")
        return _unicode(value)
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        if not value:
            raise ValueError("must not be empty")
        return value
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, (str, list)) for p in value):
        raise ValueError(f"{len(value)} prompts in one request; send one prompt per request")
    raise ValueError("must be a string, a list of token ids, or a list holding one string")


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise ValueError("must be a non-empty string or a list of non-empty strings")
    return [_unicode(s) for s in value]


def _content(value: Any) -> str:
    """Message content: a string, or a list of text parts (OpenAI's multi-part form), joined."""
    if value is None:
        return ""
    if isinstance(value, str):
        return _unicode(value)
    if isinstance(value, list):
        texts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError("content parts must be {\"type\": \"text\", \"text\": ...}; this model reads text only")
            texts.append(part["text"])
        return _unicode("".join(texts))
    raise ValueError("must be a string or a list of text parts")


def _only_one(n: int) -> int:
    if n != 1:
        raise ValueError(f"only n=1 is supported, got {n}; send {n} separate requests")
    return n


def _zero(value: float) -> float:
    if value != 0:
        raise ValueError("penalties are not supported: leave it at 0")
    return value


def _unsupported(what: str):
    """A validator that accepts only a value that changes nothing (None, False, 0, empty)."""
    def check(value: Any) -> Any:
        if value:
            raise ValueError(f"{what} is not supported")
        return value
    return check


def _one_best(value: int | None) -> int | None:
    if value not in (None, 1):
        raise ValueError(f"only best_of=1 is supported, got {value}")
    return value


Prompt = Annotated[str | list[int], BeforeValidator(_prompt)]
Stop = Annotated[list[str], BeforeValidator(_stop)]
N = Annotated[int, AfterValidator(_only_one)]
Penalty = Annotated[float, AfterValidator(_zero)]
LogitBias = Annotated[dict[str, float] | None, AfterValidator(_unsupported("biasing logits"))]
Seed = Annotated[int | None, Field(ge=-INT64, lt=INT64)]
Int64 = Annotated[int, Field(ge=-INT64, lt=INT64)]  # what the control plane's msgpack carries
Text = Annotated[str, AfterValidator(_unicode)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completions and chat completions share; pdlab's extensions (as in vLLM) are marked."""

    model_config = ConfigDict(extra="forbid")

    model: Text | None = None  # None: the served model
    temperature: float | None = None  # None: 1.0
    top_p: float | None = None  # None: 1.0
    top_k: Int64 | None = None  # extension; 0 or -1 disables it
    seed: Seed = None
    stop: Stop = Field(default_factory=list)
    stop_token_ids: list[Int64] = Field(default_factory=list)  # extension
    ignore_eos: bool = False  # extension
    n: N = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: LogitBias = None
    user: str | None = None


class CompletionRequest(SamplingFields):
    prompt: Prompt
    max_tokens: Int64 | None = 16  # None: up to the model's context
    logprobs: Int64 | None = None  # how many top log-probabilities per token
    echo: Annotated[bool, AfterValidator(_unsupported("echoing the prompt"))] = False
    best_of: Annotated[int | None, AfterValidator(_one_best)] = None
    suffix: Annotated[str | None, AfterValidator(_unsupported("a suffix (insertion)"))] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... travel along, unused

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str, BeforeValidator(_content)] = ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: Int64 | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: Int64 | None = None  # None (and no max_tokens): up to the model's context
    logprobs: bool = False
    top_logprobs: Int64 | None = None
    tools: Annotated[list[dict[str, Any]] | None, AfterValidator(_unsupported("tool calling"))] = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None

    @field_validator("messages")
    @classmethod
    def _some_messages(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not messages:
            raise ValueError("must hold at least one message")
        return messages

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type") != "text":
            raise ValueError("only {\"type\": \"text\"} is supported")
        return value


# --- responses ----------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, num_prompt_tokens: int, num_output_tokens: int) -> UsageInfo:
        return cls(prompt_tokens=num_prompt_tokens, completion_tokens=num_output_tokens,
                   total_tokens=num_prompt_tokens + num_output_tokens)


def _now() -> int:
    return int(time.time())


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] = Field(default_factory=list)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "pdlab"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
