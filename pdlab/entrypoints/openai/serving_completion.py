"""`POST /v1/completions`: a prompt (text or token ids) in, text out."""

from __future__ import annotations

from pdlab.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from pdlab.entrypoints.openai.serving import Generation, OpenAIServing, top_logprobs

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


class ServingCompletion(OpenAIServing):
    id_prefix = "cmpl"
    prompt_param = "prompt"

    def encode(self, body: CompletionRequest) -> list[int]:
        if isinstance(body.prompt, str):
            return self.tokenizer.encode(body.prompt)  # with BOS where the model wants one, as `LLM.generate`
        return list(body.prompt)

    def max_tokens(self, body: CompletionRequest) -> tuple[str, int | None, int | None]:
        if "max_tokens" in body.model_fields_set:
            return "max_tokens", body.max_tokens, None
        return "max_tokens", None, DEFAULT_MAX_TOKENS

    def num_logprobs(self, body: CompletionRequest) -> int | None:
        return body.logprobs

    def response(self, gen: Generation, text: str, finish_reason: str | None) -> CompletionResponse:
        choice = CompletionChoice(text=text, finish_reason=finish_reason, logprobs=self._logprobs(gen, gen.logprobs,
                                                                                                   gen.token_ids))
        return CompletionResponse(id=gen.request_id, model=self.info.model_name, choices=[choice], usage=gen.usage())

    def chunk(self, gen: Generation, text: str, finish_reason: str | None, logprobs: list[dict[int, float]]
              ) -> CompletionResponse:
        ids = gen.token_ids[len(gen.token_ids) - len(logprobs):] if logprobs else []
        choice = CompletionChoice(text=text, finish_reason=finish_reason, logprobs=self._logprobs(gen, logprobs, ids))
        return CompletionResponse(id=gen.request_id, model=self.info.model_name, choices=[choice])

    def usage_chunk(self, gen: Generation) -> CompletionResponse:
        return CompletionResponse(id=gen.request_id, model=self.info.model_name, choices=[], usage=gen.usage())

    def _logprobs(self, gen: Generation, entries: list[dict[int, float]], token_ids: list[int]
                  ) -> CompletionLogprobs | None:
        if gen.params.logprobs is None or not entries:
            return None
        out = CompletionLogprobs()
        offset = 0
        for token_id, entry in zip(token_ids, entries):
            token = self.token_text(token_id)
            out.tokens.append(token)
            out.token_logprobs.append(entry.get(token_id, float("-inf")))
            out.top_logprobs.append({self.token_text(t): lp for t, lp in top_logprobs(entry, gen.params.logprobs)})
            out.text_offset.append(offset)
            offset += len(token)
        return out
