"""`POST /v1/chat/completions`: a conversation through the model's chat template in, the assistant's reply out."""

from __future__ import annotations

from jinja2 import TemplateError

from pdlab.entrypoints.openai.errors import APIError
from pdlab.entrypoints.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    DeltaMessage,
    TokenLogprob,
    TopLogprob,
)
from pdlab.entrypoints.openai.serving import Generation, OpenAIServing, top_logprobs
from pdlab.errors import PdlabError
from pdlab.models.tokenizer import encode_chat


class ServingChat(OpenAIServing):
    id_prefix = "chatcmpl"
    prompt_param = "messages"

    def encode(self, body: ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        try:
            return encode_chat(self.tokenizer, messages)
        except PdlabError as e:  # no chat template
            raise APIError(400, str(e), param="messages") from None
        except (TemplateError, ValueError, TypeError, KeyError) as e:  # the template's own checks (roles must alternate, ...)
            raise APIError(400, f"the model's chat template rejected the conversation: {e}", param="messages") from None

    def max_tokens(self, body: ChatCompletionRequest) -> tuple[str, int | None, int | None]:
        if body.max_completion_tokens is not None:
            return "max_completion_tokens", body.max_completion_tokens, None
        return "max_tokens", body.max_tokens, None  # unset: as long as the context allows, as OpenAI

    def num_logprobs(self, body: ChatCompletionRequest) -> int | None:
        if not body.logprobs:
            if body.top_logprobs:
                raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
            return None
        return body.top_logprobs or 0

    def response(self, gen: Generation, text: str, finish_reason: str | None) -> ChatCompletionResponse:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish_reason,
                            logprobs=self._logprobs(gen, gen.logprobs, gen.token_ids))
        return ChatCompletionResponse(id=gen.request_id, model=self.info.model_name, choices=[choice],
                                      usage=gen.usage())

    def opening_chunk(self, gen: Generation) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=gen.request_id, model=self.info.model_name,
                                   choices=[ChatChunkChoice(delta=DeltaMessage(role="assistant", content=""))])

    def chunk(self, gen: Generation, text: str, finish_reason: str | None, logprobs: list[dict[int, float]]
              ) -> ChatCompletionChunk:
        ids = gen.token_ids[len(gen.token_ids) - len(logprobs):] if logprobs else []
        choice = ChatChunkChoice(delta=DeltaMessage(content=text or None), finish_reason=finish_reason,
                                 logprobs=self._logprobs(gen, logprobs, ids))
        return ChatCompletionChunk(id=gen.request_id, model=self.info.model_name, choices=[choice])

    def usage_chunk(self, gen: Generation) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=gen.request_id, model=self.info.model_name, choices=[], usage=gen.usage())

    def _logprobs(self, gen: Generation, entries: list[dict[int, float]], token_ids: list[int]) -> ChatLogprobs | None:
        if gen.params.logprobs is None or not entries:
            return None
        content = []
        for token_id, entry in zip(token_ids, entries):
            top = [self._top(t, lp) for t, lp in top_logprobs(entry, gen.params.logprobs)]
            content.append(TokenLogprob(**self._top(token_id, entry.get(token_id, float("-inf"))).model_dump(),
                                        top_logprobs=top))
        return ChatLogprobs(content=content)

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        token = self.token_text(token_id)
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")))
