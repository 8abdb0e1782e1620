"""Both tokenizers present the engine's interface; text round-trips through each."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pdlab.errors import InvalidRequestError, ModelNotFoundError
from pdlab.models.presets import PRESETS
from pdlab.models.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is PD disaggregation?"}]

# --- ByteTokenizer (random-weight presets)


@given(st.text())
def test_byte_tokenizer_round_trip(text: str) -> None:
    tokenizer = ByteTokenizer(vocab_size=512)
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id and all(3 <= i < 259 for i in ids[1:])
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text, add_special_tokens=False) == ids[1:]


def test_byte_tokenizer_specials_and_ids_past_the_bytes() -> None:
    tokenizer = ByteTokenizer(vocab_size=512)
    hi = tokenizer.encode("hi", add_special_tokens=False)
    assert tokenizer.decode([1, *hi, 2], skip_special_tokens=False) == "<s>hi</s>"
    assert tokenizer.decode([1, *hi, 2]) == "hi"
    assert tokenizer.decode([3 + ord("a") + 256]) == "a"  # wraps around: random models emit any id
    assert isinstance(tokenizer.decode(list(range(512))), str)


def test_byte_tokenizer_chat_template() -> None:
    tokenizer = ByteTokenizer(vocab_size=512)
    text = tokenizer.apply_chat_template(CHAT)
    assert text == "<|system|>\nBe brief.\n<|user|>\nWhat is PD disaggregation?\n<|assistant|>\n"
    assert tokenizer.apply_chat_template(CHAT, tokenize=True) == tokenizer.encode(text)
    assert not tokenizer.apply_chat_template(CHAT, add_generation_prompt=False).endswith("<|assistant|>\n")


@pytest.mark.parametrize("name", PRESETS)
def test_byte_tokenizer_fits_every_preset(name: str) -> None:
    config = PRESETS[name]
    tokenizer = ByteTokenizer.for_config(config)
    assert len(tokenizer) == config.vocab_size
    assert tokenizer.eos_token_id == config.eos_token_id and tokenizer.eos_token_ids == (config.eos_token_id,)


def test_byte_tokenizer_rejects_impossible_vocabularies() -> None:
    with pytest.raises(ValueError, match="vocab_size >= 259"):
        ByteTokenizer(vocab_size=100)
    with pytest.raises(ValueError, match="collides"):
        ByteTokenizer(vocab_size=512, eos_token_id=100)


# --- the real SmolLM2 tokenizer, read from the GGUF file


def test_gguf_tokenizer_round_trip(smollm2_tokenizer: Tokenizer) -> None:
    text = "Prefill and decode run on different GPUs — naïvely 2× faster? 🤔"
    ids = smollm2_tokenizer.encode(text)
    assert smollm2_tokenizer.decode(ids) == text
    assert len(ids) < len(text)  # real subwords, not bytes


def test_gguf_tokenizer_specials(smollm2_tokenizer: Tokenizer) -> None:
    assert smollm2_tokenizer.eos_token_id == 2 and smollm2_tokenizer.eos_token_ids == (2,)
    assert smollm2_tokenizer.bos_token_id == 1
    assert len(smollm2_tokenizer) == 49152
    assert smollm2_tokenizer.decode([1, 28, 2], skip_special_tokens=False) == "<|im_start|>,<|im_end|>"
    assert smollm2_tokenizer.decode([1, 28, 2]) == ","


def test_gguf_tokenizer_keeps_the_chat_template(smollm2_tokenizer: Tokenizer) -> None:
    text = smollm2_tokenizer.apply_chat_template(CHAT)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is PD disaggregation?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    default_system = smollm2_tokenizer.apply_chat_template(CHAT[1:], add_generation_prompt=False)
    assert default_system.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    ids = smollm2_tokenizer.apply_chat_template(CHAT, tokenize=True)
    assert ids == smollm2_tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|> and <|im_end|> are single tokens


def test_missing_chat_template_is_a_request_error() -> None:
    base = Tokenizer(SimpleNamespace(eos_token_id=0, chat_template=None, name_or_path="base-model"))
    with pytest.raises(InvalidRequestError, match="base-model has no chat template"):
        base.apply_chat_template(CHAT)


def test_load_tokenizer_is_cached_and_checks_its_source(smollm2_gguf: Path, tmp_path: Path) -> None:
    assert load_tokenizer(smollm2_gguf) is load_tokenizer(str(smollm2_gguf))
    with pytest.raises(ModelNotFoundError):
        load_tokenizer(tmp_path / "missing.gguf")
    with pytest.raises(ModelNotFoundError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)  # a directory without tokenizer files
