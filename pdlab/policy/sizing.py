"""The sizing defaults every driver shares: the engine, the experiment runner's simulated runs and the placement
search size an instance by these, so that the simulator cannot drift from the engine."""

from __future__ import annotations

from pdlab.policy.scheduler import SchedulerConfig

MAX_DEFAULT_MODEL_LEN = 8192  # a model's context is capped at this unless max_model_len says otherwise
CHUNKED_PREFILL_TOKENS = 2048  # the token budget of a step with chunked prefill, unless given
# Bits per weight of the transformer's linears for each weight-only quantization (None: the model's 16-bit dtype).
WEIGHT_BITS: dict[str | None, int] = {None: 16, "wint8": 8, "wint4": 4}


def max_model_len(max_position_embeddings: int, configured: int | None = None) -> int:
    """The context an instance serves: `configured`, else the model's, at most MAX_DEFAULT_MODEL_LEN."""
    return configured or min(max_position_embeddings, MAX_DEFAULT_MODEL_LEN)


def scheduler_config(max_num_seqs: int, max_num_batched_tokens: int | None, enable_chunked_prefill: bool,
                     max_model_len: int) -> SchedulerConfig:
    """An instance's scheduler limits: the token budget defaults to CHUNKED_PREFILL_TOKENS with chunked prefill
    (a step's prefill chunks share it with the decodes), else to `max_model_len` (a whole prompt in one step).
    Raises ValueError for limits the scheduler refuses."""
    budget = max_num_batched_tokens or (CHUNKED_PREFILL_TOKENS if enable_chunked_prefill else max_model_len)
    return SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                           enable_chunked_prefill=enable_chunked_prefill, max_model_len=max_model_len)
