"""Fixtures shared by the model-loading tests: the real SmolLM2 GGUF and its tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlab.errors import ModelNotFoundError
from pdlab.models.gguf_file import find_default_gguf
from pdlab.models.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    try:
        return find_default_gguf()
    except ModelNotFoundError as e:
        pytest.skip(f"the real SmolLM2 GGUF is not installed ({e})")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf: Path) -> Tokenizer:
    return load_tokenizer(smollm2_gguf)  # ~4 s; cached for the session by load_tokenizer itself
