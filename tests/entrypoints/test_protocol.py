"""Request bodies: the prompt forms OpenAI allows, and a clear message for each unsupported field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pdlab.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest


@pytest.mark.parametrize("prompt,want", [("hi", "hi"), (["hi"], "hi"), ([5, 6], [5, 6]), ([[5, 6]], [5, 6])])
def test_prompt_forms(prompt, want):
    assert CompletionRequest(prompt=prompt).prompt == want


@pytest.mark.parametrize("fields,message", [
    ({"prompt": ""}, "must not be empty"),
    ({"prompt": []}, "must not be empty"),
    ({"prompt": ["a", "b"]}, "2 prompts in one request"),
    ({"prompt": [1, "a"]}, "must be a string, a list of token ids"),
    ({"prompt": "x", "n": 3}, "only n=1 is supported"),
    ({"prompt": "x", "presence_penalty": 0.5}, "penalties are not supported"),
    ({"prompt": "x", "echo": True}, "not supported"),
    ({"prompt": "x", "best_of": 2}, "only best_of=1"),
    ({"prompt": "x", "stop": ["ok", ""]}, "non-empty"),
    ({"prompt": "x", "seed": 2**70}, "seed"),
    ({"prompt": "x", "max_token": 5}, "max_token"),
])
def test_completion_fields_rejected_with_a_reason(fields, message):
    with pytest.raises(ValidationError, match=message):
        CompletionRequest(**fields)


def test_chat_content_parts_are_joined_and_unsupported_features_named():
    body = ChatCompletionRequest(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                        {"type": "text", "text": "b"}]}])
    assert body.messages[0].content == "ab"
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], stop="END").stop == ["END"]
    for fields, message in [({"messages": []}, "at least one message"),
                            ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text only"),
                            ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
                             "tool calling"),
                            ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
                             "text")]:
        with pytest.raises(ValidationError, match=message):
            ChatCompletionRequest(**fields)
