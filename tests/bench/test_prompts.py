"""The benchmark's requests: the workload's arrivals and lengths, and prompts of the drawn lengths."""

from __future__ import annotations

import numpy as np
import pytest

from pdlab.bench.prompts import WORDS, build_requests, fit_text
from pdlab.models.tokenizer import ByteTokenizer, Tokenizer
from pdlab.workload import FixedLength, PoissonArrivals, UniformLength, WorkloadSpec, make_workload

SPEC = WorkloadSpec(num_requests=12, arrivals=PoissonArrivals(5.0), prompt_len=UniformLength(1, 300),
                    output_len=UniformLength(1, 50))


def test_arrivals_and_lengths_are_those_of_make_workload():
    """Same seed, same arrivals and lengths as pdlab.run and the simulator, whatever the prompts are made of."""
    reference = make_workload(SPEC, vocab_size=1000, seed=3)
    for tokenizer in (None, ByteTokenizer(512)):
        requests = build_requests(SPEC, seed=3, tokenizer=tokenizer)
        assert [r.spec.arrival_s for r in requests] == [r.arrival_s for r in reference]
        assert [r.spec.max_tokens for r in requests] == [r.max_tokens for r in reference]
        assert [r.spec.num_prompt_tokens for r in requests] == [r.num_prompt_tokens for r in reference]


def test_requests_are_deterministic_in_the_seed():
    first = build_requests(SPEC, seed=1, tokenizer=ByteTokenizer(512))
    assert first == build_requests(SPEC, seed=1, tokenizer=ByteTokenizer(512))
    assert first != build_requests(SPEC, seed=2, tokenizer=ByteTokenizer(512))


def test_word_prompts_have_one_word_per_drawn_token():
    for request in build_requests(SPEC, seed=0):
        words = request.prompt.split()
        assert len(words) == request.spec.num_prompt_tokens == request.num_prompt_tokens
        assert set(words) <= set(WORDS)


def test_byte_tokenizer_prompts_have_exact_lengths():
    tokenizer = ByteTokenizer(512)
    for request in build_requests(SPEC, seed=0, tokenizer=tokenizer):
        assert len(tokenizer.encode(request.prompt, add_special_tokens=False)) == request.spec.num_prompt_tokens
        assert request.num_prompt_tokens == request.spec.num_prompt_tokens


def test_token_id_prompts_are_the_workload_ids():
    tokenizer = ByteTokenizer(512)
    reference = make_workload(SPEC, vocab_size=512, seed=4)
    requests = build_requests(SPEC, seed=4, tokenizer=tokenizer, token_ids=True)
    assert [r.prompt for r in requests] == [list(r.prompt_token_ids) for r in reference]


@pytest.fixture(scope="module")
def bpe_tokenizer() -> Tokenizer:
    """A small BPE tokenizer trained in memory: its merges change counts across the seams of decoded ids."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(0, len(WORDS), 7)]
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>"))


def test_bpe_prompts_are_fitted_to_the_drawn_length(bpe_tokenizer):
    spec = WorkloadSpec(num_requests=30, arrivals=PoissonArrivals(1.0), prompt_len=UniformLength(1, 400),
                        output_len=FixedLength(4))
    requests = build_requests(spec, seed=0, tokenizer=bpe_tokenizer)
    exact = [len(bpe_tokenizer.encode(r.prompt, add_special_tokens=False)) == r.spec.num_prompt_tokens
             for r in requests]
    assert all(exact)
    # The plain decode of the drawn ids would not have been exact: the fitting did something.
    raw_counts = [len(bpe_tokenizer.encode(bpe_tokenizer.decode(list(r.prompt_token_ids)), add_special_tokens=False))
                  for r in make_workload(spec, vocab_size=bpe_tokenizer.vocab_size, seed=0)]
    assert raw_counts != [r.spec.num_prompt_tokens for r in requests]


def test_fit_text_returns_its_true_count_when_it_cannot_be_exact():
    class Doubling:  # every token encodes back to two: no text has an odd count
        def decode(self, ids, skip_special_tokens=True):
            return "x" * len(ids)

        def encode(self, text, add_special_tokens=False):
            return [0] * (2 * len(text))

    text, count = fit_text(Doubling(), [5, 6, 7], 3, np.random.default_rng(0), list(range(10)))
    assert count == len(Doubling().encode(text)) and count != 3
