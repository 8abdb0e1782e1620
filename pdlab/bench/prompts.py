"""The requests a benchmark sends: `make_workload`'s arrivals and lengths, turned into prompts.

Arrival times and prompt/output lengths come from `pdlab.workload.make_workload`
with the run's seed, so they equal those of `python -m pdlab.run` and the
simulator for the same distributions and seed (each stream has its own
generator). What differs is the prompt itself, which an HTTP endpoint takes as
text:

- with a tokenizer, the drawn token ids are decoded to text and the text is
  adjusted (re-encoded, cut or padded, a few rounds) until it encodes to the
  drawn length, counted without special tokens; the server may add BOS or a
  chat template, which its reported usage then includes;
- with `prompt_token_ids`, the ids are sent as they are (exact, and the same
  ids `pdlab.run` would use for the same seed);
- without a tokenizer, the prompt is that many common English words, each
  about one token in BPE vocabularies, so lengths are approximate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pdlab.workload.workload import MIN_SYNTHETIC_TOKEN_ID, RequestSpec, WorkloadSpec, make_workload

# Short, frequent words: one token each in the GPT-2, Llama and Qwen vocabularies (with the leading space).
WORDS = tuple(
    """the of and to in is was for on that with as by at from his her he she it they we you are be this which
    or an had not but were have one all their there been has more when who will would can no if so out up
    what about into than them only other time new some could these two may first then do any like my now over
    such our man me even most made after also did many before must through back years where much your way well
    down should because each just those people how too little state good very make world still own see men work
    long get here between both life being under never day same another know while last might us great old year
    off come since against go came right used take three""".split()  # noqa: SIM905 -- a word list reads better as text
)

MAX_FIT_ROUNDS = 10


@dataclass(frozen=True)
class BenchRequest:
    """A workload request and the prompt sent for it."""

    spec: RequestSpec
    prompt: str | list[int]
    num_prompt_tokens: int  # counted here; the server's usage, when reported, replaces it in the record

    @property
    def request_id(self) -> str:
        return self.spec.request_id


def build_requests(
    spec: WorkloadSpec, seed: int, tokenizer=None, token_ids: bool = False
) -> list[BenchRequest]:
    """The run's requests, sorted by arrival; deterministic in `seed`.

    `tokenizer` is a `pdlab.models.tokenizer.TokenizerLike` or None (word prompts).
    """
    if tokenizer is None:
        specs = make_workload(spec, vocab_size=len(WORDS), seed=seed, min_token_id=0)
        return [
            BenchRequest(s, " ".join(WORDS[i] for i in s.prompt_token_ids), s.num_prompt_tokens) for s in specs
        ]
    if token_ids:
        specs = make_workload(spec, vocab_size=tokenizer.vocab_size, seed=seed)
        return [BenchRequest(s, list(s.prompt_token_ids), s.num_prompt_tokens) for s in specs]
    vocab_size, min_token_id = _text_safe_ids(tokenizer)
    specs = make_workload(spec, vocab_size=vocab_size, seed=seed, min_token_id=min_token_id)
    fit_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(5)[4])
    pad_ids = whole_token_ids(tokenizer, fit_rng, (min_token_id, vocab_size))
    requests = []
    for s in specs:
        text, num_tokens = fit_text(tokenizer, list(s.prompt_token_ids), s.num_prompt_tokens, fit_rng, pad_ids)
        requests.append(BenchRequest(s, text, num_tokens))
    return requests


def _text_safe_ids(tokenizer) -> tuple[int, int]:
    """(vocab_size, min_token_id) of ids that decode to text which encodes back to the same count."""
    from pdlab.models.tokenizer import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        # Printable ASCII: one byte, one id, so the text round-trips exactly.
        return ByteTokenizer.num_special_ids + 127, ByteTokenizer.num_special_ids + 32
    return tokenizer.vocab_size, MIN_SYNTHETIC_TOKEN_ID


def whole_token_ids(tokenizer, rng: np.random.Generator, id_range: tuple[int, int], num: int = 64,
                    max_tries: int = 4000) -> list[int]:
    """Up to `num` ids in `id_range` that decode to whole characters and encode back to themselves alone.

    Padding with these (rather than byte-fallback pieces of a character) lets `fit_text` converge.
    """
    found: list[int] = []
    for candidate in rng.integers(*id_range, size=max_tries).tolist():
        text = tokenizer.decode([candidate], skip_special_tokens=True)
        if text and "\ufffd" not in text and tokenizer.encode(text, add_special_tokens=False) == [candidate]:
            found.append(candidate)
            if len(found) == num:
                break
    return found or list(range(*id_range))


def fit_text(
    tokenizer, ids: list[int], target: int, rng: np.random.Generator, pad_ids: list[int]
) -> tuple[str, int]:
    """Text that encodes (without special tokens) to `target` tokens, starting from `ids`; and its token count.

    Decoding and re-encoding random ids merges or splits tokens at their seams
    (and byte-fallback pieces of a character decode to U+FFFD, which encodes
    to several), so the text is re-encoded, then cut or padded with
    `pad_ids` until the count is right; each overshoot cuts deeper, which
    drops a broken character at the end. vLLM's random dataset does much the
    same. Gives up after `MAX_FIT_ROUNDS` with the closest text found.
    """
    best: tuple[int, str, int] | None = None  # (distance, text, count)
    cut = 0
    for _ in range(MAX_FIT_ROUNDS):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        encoded = tokenizer.encode(text, add_special_tokens=False)
        count = len(encoded)
        if best is None or abs(count - target) < best[0]:
            best = (abs(count - target), text, count)
        if count == target:
            break
        if count > target:
            keep = max(0, target - cut)
            cut = max(1, 2 * cut)
            encoded = encoded[:keep]
        ids = encoded + rng.choice(pad_ids, size=target - len(encoded)).tolist()
    return best[1], best[2]
