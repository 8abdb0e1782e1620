"""Text <-> token ids behind one small interface, whatever the model's source.

The engine sees only `TokenizerLike`. Real models get `Tokenizer`, a thin
wrapper over a transformers tokenizer read from the model's own files (a
Hugging Face directory, or the vocabulary and chat template embedded in a GGUF
file). Random-weight presets get `ByteTokenizer`: UTF-8 bytes shifted past a
few special ids, so any text round-trips and any vocabulary size works.
Nothing here downloads: transformers is always called with `local_files_only`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Protocol

from pdlab.errors import InvalidRequestError, ModelNotFoundError
from pdlab.models.config import ModelConfig

Message = dict[str, Any]  # {"role": "user", "content": "..."}, as OpenAI and transformers spell it


class TokenizerLike(Protocol):
    """What the engine needs from a tokenizer."""

    eos_token_id: int | None
    eos_token_ids: tuple[int, ...]  # every id that ends generation; includes eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, the ones the model expects (BOS for Llama).

        Text made by `apply_chat_template` already holds them: encode it with
        `add_special_tokens=False`, or ask `apply_chat_template` for ids.
        """
        ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; never raises on ids inside the vocabulary."""
        ...

    def apply_chat_template(
        self, messages: list[Message], add_generation_prompt: bool = True, tokenize: bool = False
    ) -> str | list[int]:
        """The prompt for a chat, as text (or as ids when `tokenize`).

        Raises `InvalidRequestError` when the model has no chat template.
        """
        ...


class Tokenizer:
    """A transformers tokenizer presenting `TokenizerLike`; `hf` is the wrapped object."""

    def __init__(self, hf: Any, extra_eos_token_ids: tuple[int, ...] = ()) -> None:
        self.hf = hf
        self.eos_token_id: int | None = hf.eos_token_id
        first = () if hf.eos_token_id is None else (hf.eos_token_id,)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(first + tuple(extra_eos_token_ids)))

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def chat_template(self) -> str | None:
        return self.hf.chat_template

    def __len__(self) -> int:
        return len(self.hf)

    @property
    def vocab_size(self) -> int:
        """The base vocabulary, without added special tokens (Llama 3's sit above it)."""
        return self.hf.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[Message], add_generation_prompt: bool = True, tokenize: bool = False
    ) -> str | list[int]:
        if not self.hf.chat_template:
            raise InvalidRequestError(f"{self.hf.name_or_path} has no chat template; send a plain completion prompt")
        return self.hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=tokenize, return_dict=False
        )


class ByteTokenizer:
    """UTF-8 bytes as ids `num_special_ids + byte`, for models with random weights.

    Ids 0, 1, 2 are pad, BOS and EOS unless the config names other BOS/EOS
    ids (Llama 3's 128000/128001 stay as they are, above the byte range).
    Ids past the byte range, which a random model emits freely, decode to
    byte `(id - num_special_ids) % 256` so that every id yields some text.
    """

    num_special_ids = 3
    pad_token_id = 0

    def __init__(self, vocab_size: int, bos_token_id: int = 1, eos_token_id: int = 2) -> None:
        byte_ids = range(self.num_special_ids, self.num_special_ids + 256)
        if vocab_size < byte_ids.stop:
            raise ValueError(f"ByteTokenizer needs vocab_size >= {byte_ids.stop}, got {vocab_size}")
        for special in (bos_token_id, eos_token_id):
            if special in byte_ids or not 0 <= special < vocab_size:
                raise ValueError(f"special id {special} collides with bytes {byte_ids} or leaves vocab {vocab_size}")
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.eos_token_ids = (eos_token_id,)
        self._special_text = {self.pad_token_id: "<pad>", bos_token_id: "<s>", eos_token_id: "</s>"}

    @classmethod
    def for_config(cls, config: ModelConfig) -> ByteTokenizer:
        """Keep the config's BOS/EOS ids when it names them, else 1 and 2."""
        bos = 1 if config.bos_token_id is None else config.bos_token_id
        eos = 2 if config.eos_token_id is None else config.eos_token_id
        return cls(config.vocab_size, bos_token_id=bos, eos_token_id=eos)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.num_special_ids + b for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        pieces: list[str] = []
        run = bytearray()  # consecutive bytes decode together: a character may span several
        for i in ids:
            if i in self._special_text:
                pieces.append(run.decode("utf-8", errors="replace"))
                run.clear()
                if not skip_special_tokens:
                    pieces.append(self._special_text[i])
            else:
                run.append((i - self.num_special_ids) % 256)
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def apply_chat_template(
        self, messages: list[Message], add_generation_prompt: bool = True, tokenize: bool = False
    ) -> str | list[int]:
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<|assistant|>\n"
        return self.encode(text) if tokenize else text


def load_tokenizer(source: str | Path) -> Tokenizer:
    """The tokenizer of a Hugging Face model directory or of a `.gguf` file.

    Cached per resolved path for the life of the process (a GGUF vocabulary
    takes seconds to parse); callers share the returned object and must not
    mutate it.
    """
    return _load_tokenizer(str(Path(source).expanduser().resolve()))


@functools.lru_cache(maxsize=8)
def _load_tokenizer(path_str: str) -> Tokenizer:
    from transformers import AutoTokenizer  # heavy; only real models need it

    path = Path(path_str)
    if path.is_dir():
        from pdlab.models.hf_dir import read_eos_token_ids

        try:
            hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:  # no tokenizer.json / tokenizer_config.json here
            raise ModelNotFoundError(f"{path} holds no tokenizer transformers can read: {e}") from None
        return Tokenizer(hf, extra_eos_token_ids=read_eos_token_ids(path))
    if path.is_file() and path.suffix == ".gguf":
        from pdlab.models.gguf_file import read_gguf_eos_token_ids

        hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        return Tokenizer(hf, extra_eos_token_ids=read_gguf_eos_token_ids(path))
    raise ModelNotFoundError(f"no tokenizer at {path}: expected a model directory or a .gguf file")


def encode_chat(tokenizer: TokenizerLike, messages: list[Message]) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template, ready for the reply."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template writes the special tokens (BOS included) itself.
    return tokenizer.encode(text, add_special_tokens=False)
