"""Turn the logits of the sampled positions into next tokens.

Randomness is per request and per output position: token i of a request with
seed s is drawn from a generator seeded with mix(s, i). The same request thus
samples the same tokens whatever else shares its batch, whichever device or
process computes the step (a prefill instance draws token 0, the decode
instance continues with token 1).
"""

from __future__ import annotations

import torch

from pdlab.models.attention import copy_to_device
from pdlab.sampling_params import SamplingParams

_MASK63 = (1 << 63) - 1


def mix_seed(seed: int, index: int) -> int:
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) & _MASK63


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], indices: list[int]) -> list[int]:
    """logits: [N, V] float32. Row r uses params[r], seed seeds[r] and output index indices[r]."""
    return sample_on_device(logits, params, seeds, indices).tolist()


def sample_on_device(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int],
                     indices: list[int]) -> torch.Tensor:
    """`sample`'s tokens [N] (int64), left on the logits' device: nothing here waits for the GPU (every host
    list goes over as a non-blocking copy), so the host can plan the next step while this one runs."""
    tokens = logits.argmax(dim=-1)
    rows = [r for r, p in enumerate(params) if not p.greedy]
    if rows:
        index = copy_to_device(torch.tensor(rows), logits.device) if len(rows) < len(params) else None
        sub = _filter(logits if index is None else logits[index], [params[r] for r in rows])
        probs = torch.softmax(sub, dim=-1)  # [R, V]
        noise = torch.empty_like(probs)
        for i, r in enumerate(rows):
            generator = torch.Generator(device=logits.device).manual_seed(mix_seed(seeds[r], indices[r]))
            noise[i].exponential_(generator=generator)
        # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race).
        drawn = (probs / noise).argmax(dim=-1)
        if index is None:
            return drawn
        tokens[index] = drawn
    return tokens


def _filter(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, then top-p, each row with its own values. logits: [R, V]."""
    temperature = copy_to_device(torch.tensor([p.temperature for p in params]), logits.device)[:, None]
    logits = logits / temperature
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    if not any(top_k) and all(p >= 1.0 for p in top_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = copy_to_device(torch.tensor([k if 0 < k < vocab else vocab for k in top_k]), logits.device)[:, None]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    remove = ranks >= k
    probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
    # Drop a token when the tokens ranked above it already reach top_p (the top one always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= mass_before >= copy_to_device(torch.tensor(top_p), logits.device)[:, None]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
