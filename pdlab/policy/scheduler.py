"""Continuous batching: which requests run in the next step, and how many tokens each.

Standard library only; the real engine and the simulator drive the same object:

    batch = scheduler.schedule()          # pick requests, allocate their blocks
    sampled = execute(batch)              # run the model (or wait cost_model.step_time)
    scheduler.update(batch, sampled, now) # advance requests, finish, free blocks

Two modes, as in vLLM:
- chunked prefill on: running requests first (decodes and unfinished prompt
  chunks), then waiting ones, until the token budget is spent. Prefill and
  decode tokens share a step (the strong colocated baseline).
- chunked prefill off: a step is either whole prompts (waiting requests are
  admitted first) or one decode token for every running request.
When a running request needs a block and none is free, the most recently
admitted running request is preempted: its blocks are freed and it goes back to
the front of the waiting queue, to be recomputed from its prompt and outputs.

Disaggregation adds two paths, both driven by the cluster layer:
- decode side: `add_remote` queues a request whose prompt another instance
  computes; `reserve` gives queued ones blocks for their prompt's KV (admission
  control: they wait, in order, while blocks or sequence slots are short);
  `complete_transfer` joins a request to the running batch with its prompt
  already computed and its first token appended.
- either side: a request with `keep_blocks_after_finish` keeps its blocks when
  it finishes, until `release`, because another party may still be reading
  them (a prefill instance's KV on its way out) or writing them (a decode
  instance's reservation after an abort, while a late transfer may land).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pdlab.policy.block_manager import BlockManager
from pdlab.policy.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"with chunked prefill off, max_num_batched_tokens ({self.max_num_batched_tokens}) "
                f"must be >= max_model_len ({self.max_model_len}) so that any prompt fits one step"
            )


@dataclass(frozen=True)
class ScheduledRequest:
    """Compute positions [start, start + num_tokens) of `request` in this step."""

    request: Request
    start: int
    num_tokens: int
    # True when this chunk reaches the last known token, so the step samples one.
    sample: bool

    @property
    def phase(self) -> Literal["prefill", "decode"]:
        return "decode" if self.num_tokens == 1 and self.start > 0 and self.sample else "prefill"


@dataclass
class ScheduledBatch:
    items: list[ScheduledRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(item.num_tokens for item in self.items)

    @property
    def num_requests(self) -> int:
        return len(self.items)

    @property
    def kind(self) -> Literal["empty", "prefill", "decode", "mixed"]:
        phases = {item.phase for item in self.items}
        if not phases:
            return "empty"
        return phases.pop() if len(phases) == 1 else "mixed"

    def signature(self) -> tuple[tuple[str, int, int], ...]:
        """What was scheduled, comparable across drivers: (request id, start, tokens)."""
        return tuple((item.request.request_id, item.start, item.num_tokens) for item in self.items)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.reserving: deque[Request] = deque()  # decode side, awaiting blocks for remote KV
        self.transferring: dict[str, Request] = {}  # decode side, blocks reserved
        self.held: dict[str, Request] = {}  # prefill side, finished but blocks still being read
        self.requests: dict[str, Request] = {}  # every unfinished request, by id

    # --- queues -------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def has_work(self) -> bool:
        """Whether `schedule` can return a non-empty batch."""
        return bool(self.waiting or self.running)

    def live_requests(self) -> list[Request]:
        """Every request that may hold blocks (for invariant checks)."""
        return [*self.requests.values(), *self.held.values()]

    def add(self, request: Request) -> None:
        """Queue a new request. The caller has checked that its prompt fits the model."""
        self._register(request, RequestStatus.WAITING)
        self.waiting.append(request)

    def _register(self, request: Request, status: RequestStatus) -> None:
        if request.request_id in self.requests or request.request_id in self.held:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if not 0 < request.num_tokens < self.config.max_model_len:
            raise ValueError(
                f"request {request.request_id}: {request.num_tokens} tokens; "
                f"must be between 1 and max_model_len - 1 ({self.config.max_model_len - 1})"
            )
        request.status = status
        self.requests[request.request_id] = request

    def finish(self, request_id: str, reason: str, now_s: float) -> Request | None:
        """End a request wherever it is and free its blocks (or hold them, see
        `keep_blocks_after_finish`); None if unknown or already finished."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        elif request.status is RequestStatus.RESERVING:
            self.reserving.remove(request)
        else:
            del self.transferring[request_id]
        if request.keep_blocks_after_finish:
            self.held[request_id] = request
        else:
            self.block_manager.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.finish_time_s = now_s
        return request

    def abort(self, request_id: str, now_s: float) -> Request | None:
        """Finish an unfinished request with reason "abort"; None if unknown or finished.

        A held request is already finished: its blocks wait for `release`, which
        only the party that knows the transfer has stopped may call.
        """
        return self.finish(request_id, "abort", now_s)

    # --- disaggregation -------------------------------------------------------------

    def add_remote(self, request: Request) -> None:
        """Decode side: queue a request whose prompt KV another instance will compute and send."""
        self._register(request, RequestStatus.RESERVING)
        self.reserving.append(request)

    def reserve(self) -> list[Request]:
        """Decode side: give queued remote requests blocks for their known tokens, in arrival order.

        The known tokens are the prompt and, for a request resumed elsewhere
        after an instance failed, the output tokens it already has: the remote
        prefill computes the KV of all of them. Returns the requests that got
        blocks (now TRANSFERRING): the caller sends their prefill tasks with
        these block ids. The head of the queue waits while blocks or sequence
        slots are short; nothing is dropped.
        """
        reserved = []
        while self.reserving and len(self.running) + len(self.transferring) < self.config.max_num_seqs:
            request = self.reserving[0]
            if not self.block_manager.can_allocate(request, request.num_tokens):
                break
            self.block_manager.allocate(request, request.num_tokens)
            self.reserving.popleft()
            request.status = RequestStatus.TRANSFERRING
            self.transferring[request.request_id] = request
            reserved.append(request)
        return reserved

    def complete_transfer(self, request_id: str, first_token_id: int, now_s: float) -> Request | None:
        """Decode side: the KV of the known tokens has landed; join the running batch with the token
        the prefill sampled after them.

        Returns None for a request that is no longer transferring (aborted, timed out).
        """
        request = self.transferring.pop(request_id, None)
        if request is None:
            return None
        request.num_computed_tokens = request.num_tokens
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        self.append_token(request, first_token_id, now_s)
        return request

    def release(self, request_id: str) -> Request | None:
        """Free the blocks of a finished request held by `keep_blocks_after_finish`."""
        request = self.held.pop(request_id, None)
        if request is not None:
            self.block_manager.free(request)
        return request

    # --- schedule -----------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        if self.config.enable_chunked_prefill:
            budget = self._schedule_running(batch, budget)
            if not batch.preempted_ids:
                self._schedule_waiting(batch, budget, chunked=True)
        else:
            self._schedule_waiting(batch, budget, chunked=False)
            if not batch.items:
                self._schedule_running(batch, budget)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_tokens = min(request.num_uncomputed_tokens, budget)
            end = request.num_computed_tokens + num_tokens
            while not self.block_manager.can_allocate(request, end):
                victim = self.running[-1]
                self._preempt(victim)
                batch.preempted_ids.append(victim.request_id)
                if victim is request:
                    return budget
            self.block_manager.allocate(request, end)
            batch.items.append(self._item(request, num_tokens))
            budget -= num_tokens
            i += 1
        return budget

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int, chunked: bool) -> int:
        # Transferring requests will join the running batch: their slots are taken.
        while self.waiting and budget > 0 and len(self.running) + len(self.transferring) < self.config.max_num_seqs:
            request = self.waiting[0]
            num_tokens = request.num_uncomputed_tokens
            if num_tokens > budget:
                if not chunked:
                    break
                num_tokens = budget
            end = request.num_computed_tokens + num_tokens
            if not self.block_manager.can_allocate(request, end):
                break
            self.block_manager.allocate(request, end)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            batch.items.append(self._item(request, num_tokens))
            budget -= num_tokens
        return budget

    def schedule_after(self, batch: ScheduledBatch) -> ScheduledBatch | None:
        """Async scheduling: the batch `schedule` will return once `batch`, still computing, is applied by
        `update`, planned now on the assumption that no request stops on the token it samples there (one
        that does has its next token computed and dropped: `update` skips finished requests). Each request
        of `batch` that sampled decodes one token, unless its length ends it; the others take their next
        prompt chunk; waiting requests fill the budget left, as `schedule` admits them (counting the
        sequence slots of requests that end by length in `batch` as taken). Allocates the blocks.

        None, changing nothing, when the outcome depends on more than that: requests joined or left the
        running batch since `batch` was scheduled, blocks are short (`schedule` would preempt), or, without
        chunked prefill, a request waits (its whole prompt would go first)."""
        c = self.config
        live = [item for item in batch.items if not item.request.is_finished]
        if [item.request for item in live] != self.running or (self.waiting and not c.enable_chunked_prefill):
            return None
        budget = c.max_num_batched_tokens
        plan = []
        for item in live:
            if budget <= 0:
                break
            request, start = item.request, item.start + item.num_tokens
            if not item.sample:
                known = request.num_tokens  # the rest of its prompt
            elif request.num_output_tokens + 1 >= request.params.max_tokens or start + 1 >= c.max_model_len:
                continue  # the token it samples in `batch` ends it by length
            else:
                known = start + 1  # that token, whose id only the device has yet
            num_tokens = min(known - start, budget)
            plan.append((request, start, num_tokens, start + num_tokens == known))
            budget -= num_tokens
        missing = sum(self.block_manager.num_missing_blocks(r, start + n) for r, start, n, _ in plan)
        if missing > self.block_manager.num_free_blocks:
            return None
        following = ScheduledBatch()
        for request, start, num_tokens, sample in plan:
            self.block_manager.allocate(request, start + num_tokens)
            following.items.append(ScheduledRequest(request, start, num_tokens, sample))
        if c.enable_chunked_prefill:
            self._schedule_waiting(following, budget, chunked=True)
        return following if following.items else None

    @staticmethod
    def _item(request: Request, num_tokens: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        return ScheduledRequest(request, start, num_tokens, sample=start + num_tokens == request.num_tokens)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    # --- update -------------------------------------------------------------------

    def update(self, batch: ScheduledBatch, sampled: Mapping[str, int], now_s: float) -> list[Request]:
        """Advance the batch's requests by what the step computed and sampled.

        `sampled` maps the id of every item with `sample=True` to its new token.
        Returns the requests that got a token or finished in this step; finished
        ones have had their blocks freed.
        """
        touched = []
        for item in batch.items:
            request = item.request
            if request.is_finished:  # aborted while the step ran
                continue
            request.num_computed_tokens += item.num_tokens
            if not item.sample:
                continue
            self.append_token(request, sampled[request.request_id], now_s)
            touched.append(request)
        return touched

    def append_token(self, request: Request, token_id: int, now_s: float) -> None:
        request.output_token_ids.append(token_id)
        request.token_times_s.append(now_s)
        if request.first_token_time_s is None:
            request.first_token_time_s = now_s
        reason = self.stop_reason(request, token_id)
        if reason is not None:
            self.finish(request.request_id, reason, now_s)

    def stop_reason(self, request: Request, token_id: int) -> str | None:
        params = request.params
        if token_id in params.stop_token_ids:
            return "stop"
        if token_id in request.eos_token_ids and not params.ignore_eos:
            return "stop"
        if request.num_output_tokens >= params.max_tokens or request.num_tokens >= self.config.max_model_len:
            return "length"
        return None
