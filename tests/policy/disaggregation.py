"""Helpers of the scheduler's disaggregation tests: a small scheduler, a request, one step, a snapshot."""

from __future__ import annotations

from pdlab.policy.block_manager import BlockManager
from pdlab.policy.request import Request
from pdlab.policy.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from pdlab.sampling_params import SamplingParams

EOS = 0
BLOCK_SIZE = 4


def make_scheduler(num_blocks: int = 16, max_num_seqs: int = 8, budget: int = 64, chunked: bool = True,
                   max_model_len: int = 64) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                             enable_chunked_prefill=chunked, max_model_len=max_model_len)
    return Scheduler(config, BlockManager(num_blocks, BLOCK_SIZE))


def req(rid: str, prompt_len: int, max_tokens: int = 8, keep: bool = False, ignore_eos: bool = False) -> Request:
    return Request(rid, [7] * prompt_len, SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos),
                   eos_token_ids=(EOS,), keep_blocks_after_finish=keep)


def snapshot(scheduler: Scheduler, requests: list[Request]) -> tuple:
    """Everything an operation could change, to assert that one changed nothing."""
    return (
        [r.request_id for r in scheduler.waiting],
        [r.request_id for r in scheduler.running],
        [r.request_id for r in scheduler.reserving],
        list(scheduler.transferring),
        list(scheduler.held),
        sorted(scheduler.requests),
        scheduler.block_manager.num_free_blocks,
        [(r.status, r.num_computed_tokens, list(r.block_ids), list(r.output_token_ids), r.finish_reason)
         for r in requests],
    )


def step(scheduler: Scheduler, token: int, now_s: float) -> ScheduledBatch:
    batch = scheduler.schedule()
    scheduler.update(batch, {i.request.request_id: token for i in batch.items if i.sample}, now_s)
    return batch
