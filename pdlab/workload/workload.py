"""A workload: N requests, each with an arrival time, a prompt and an output budget.

`make_workload` is deterministic: the same spec, vocabulary and seed give the
same requests, whichever backend (real engine or simulator) then runs them.
Arrivals, prompt lengths, output lengths and prompt token ids each draw from
their own generator, spawned from the seed, so changing one distribution leaves
the other streams untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pdlab.workload.arrivals import ArrivalProcess
from pdlab.workload.lengths import LengthDistribution

# Low ids hold special and byte tokens in most BPE vocabularies (SmolLM2's
# <|im_start|> is 1); synthetic prompts stay above them.
MIN_SYNTHETIC_TOKEN_ID = 100


@dataclass(frozen=True)
class RequestSpec:
    """One request to send. Times are seconds from the start of the run."""

    request_id: str
    arrival_s: float
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    # The user message the ids were made from (chat template applied by the
    # caller's encoder); None for a synthetic prompt.
    prompt_text: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int
    arrivals: ArrivalProcess
    prompt_len: LengthDistribution
    output_len: LengthDistribution
    # Real user messages for the first requests, so a run can show generated text.
    text_prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.num_requests < 0:
            raise ValueError(f"num_requests must be >= 0, got {self.num_requests}")
        object.__setattr__(self, "text_prompts", tuple(self.text_prompts))

    @property
    def max_request_tokens(self) -> int | None:
        """The most prompt + output tokens one synthetic request can need; None when unbounded."""
        if self.prompt_len.max_value is None or self.output_len.max_value is None:
            return None
        return self.prompt_len.max_value + self.output_len.max_value


def make_workload(
    spec: WorkloadSpec,
    vocab_size: int,
    seed: int,
    *,
    encode_prompt: Callable[[str], Sequence[int]] | None = None,
    min_token_id: int = MIN_SYNTHETIC_TOKEN_ID,
) -> list[RequestSpec]:
    """Build `spec.num_requests` requests, sorted by arrival.

    Synthetic prompts are token ids drawn uniformly from [min_token_id,
    vocab_size) with exactly the drawn length; pass the tokenizer's base
    vocabulary (Hugging Face `tokenizer.vocab_size`, which leaves out added
    special tokens such as Llama 3's at the top).

    The first `len(spec.text_prompts)` requests use those texts when
    `encode_prompt` (text -> prompt token ids, chat template included) is given;
    their drawn prompt lengths are then unused. Without an encoder (the
    simulator has no tokenizer) every request is synthetic.
    """
    if not 0 <= min_token_id < vocab_size:
        raise ValueError(f"need 0 <= min_token_id ({min_token_id}) < vocab_size ({vocab_size})")
    n = spec.num_requests
    arrival_rng, prompt_rng, output_rng, token_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )
    arrivals_s = spec.arrivals.sample(n, arrival_rng)
    prompt_lens = spec.prompt_len.sample(n, prompt_rng)
    output_lens = spec.output_len.sample(n, output_rng)
    token_ids = token_rng.integers(min_token_id, vocab_size, size=int(prompt_lens.sum()), dtype=np.int64)
    prompts = np.split(token_ids, np.cumsum(prompt_lens)[:-1]) if n else []

    texts = spec.text_prompts if encode_prompt is not None else ()
    requests = []
    for i in range(n):
        text = texts[i] if i < len(texts) else None
        ids = tuple(int(t) for t in encode_prompt(text)) if text is not None else tuple(prompts[i].tolist())
        requests.append(RequestSpec(f"req-{i}", float(arrivals_s[i]), ids, int(output_lens[i]), text))
    return requests
