"""Streamed text: deltas add up to the final text and never show what a stop string will cut."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdlab.entrypoints.openai.detokenizer import IncrementalDetokenizer, safe_prefix
from pdlab.models.tokenizer import ByteTokenizer

TOKENIZER = ByteTokenizer(512)


def final_text(text: str, stop: list[str]) -> str:
    """What the instance reports: the text cut before the first stop string."""
    cuts = [text.find(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text


def generated(text: str, stop: list[str]) -> list[int]:
    """The tokens of `text` an instance generates: it ends the request at the first token that completes a stop string."""
    ids = TOKENIZER.encode(text, add_special_tokens=False)
    for k in range(1, len(ids) + 1):
        if any(s in TOKENIZER.decode(ids[:k]) for s in stop):
            return ids[:k]
    return ids


def stream(ids: list[int], stop: list[str], seed: int) -> list[str]:
    """Feed the tokens in random groups (one update may carry several); the final update brings the instance's text."""
    text = TOKENIZER.decode(ids)
    rng = random.Random(seed)
    detok = IncrementalDetokenizer(TOKENIZER, stop)
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        deltas.append(detok.add(ids[i:i + n]))
        i += n
    deltas.append(detok.finish(final_text(text, stop)))
    return deltas


@pytest.mark.parametrize("text,stop,prefix", [
    ("hello wor", ["world"], "hello "),  # "wor" may become "world"
    ("hello world and more", ["world"], "hello "),
    ("abc", ["x"], "abc"),
    ("ab\ufffd", [], "ab"),  # a character still being formed
    ("ab", ["bc", "b"], "a"),  # "b" is a stop string on its own
    ("", ["x"], ""),
])
def test_safe_prefix(text, stop, prefix):
    assert safe_prefix(text, stop) == prefix


def test_a_multibyte_character_split_across_tokens_is_emitted_whole():
    detok = IncrementalDetokenizer(TOKENIZER)
    ids = TOKENIZER.encode("é€", add_special_tokens=False)  # 2 + 3 bytes, one token each
    assert [detok.add([t]) for t in ids] == ["", "é", "", "", "€"]


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="ab c€é\n", max_size=30),
       stop=st.lists(st.text(alphabet="ab c€", min_size=1, max_size=3), max_size=2), seed=st.integers(0, 99))
def test_deltas_add_up_to_the_final_text_and_never_pass_a_stop_string(text, stop, seed):
    ids = generated(text, stop)
    deltas = stream(ids, stop, seed)
    want = final_text(TOKENIZER.decode(ids), stop)
    assert "".join(deltas) == want
    streamed = ""
    for delta in deltas[:-1]:  # before the final update, never text the final cut removes
        streamed += delta
        assert want.startswith(streamed)
