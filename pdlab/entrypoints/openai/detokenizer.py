"""Streamed token ids -> text deltas, never past a stop string.

Each time tokens arrive, all ids so far are decoded and the new end of the
text is emitted, less a held-back tail: characters still being formed (a
trailing U+FFFD: a UTF-8 sequence cut between tokens) and any tail that could
be the start of a stop string (the instance may yet end the text there). On
the last update the instance's own final text (stop strings applied) closes
the stream, so the deltas add up to exactly that text.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from pdlab.models.tokenizer import TokenizerLike

log = logging.getLogger("pdlab.api_server")

REPLACEMENT = "\ufffd"


def safe_prefix(text: str, stop: Sequence[str]) -> str:
    """The part of `text` that no later token or stop string can change or cut."""
    cuts = [text.find(s) for s in stop if s in text]
    if cuts:
        return text[: min(cuts)]
    text = text.rstrip(REPLACEMENT)
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return text[: len(text) - hold]


class IncrementalDetokenizer:
    def __init__(self, tokenizer: TokenizerLike, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.token_ids: list[int] = []
        self.sent = ""  # text already emitted

    def add(self, new_token_ids: Sequence[int]) -> str:
        """Take the next tokens; return the text that may be emitted now ("" if none)."""
        if not new_token_ids:
            return ""
        self.token_ids.extend(new_token_ids)
        safe = safe_prefix(self.tokenizer.decode(self.token_ids), self.stop)
        return self._advance(safe)

    def finish(self, final_text: str) -> str:
        """The rest of the instance's final text."""
        delta = self._advance(final_text)
        if self.sent != final_text:
            # Decoding a prefix of the ids gave text the whole sequence does not start with;
            # what was streamed cannot be taken back.
            log.warning("streamed text %r is not a prefix of the final text %r", self.sent[-40:], final_text[-40:])
        return delta

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
