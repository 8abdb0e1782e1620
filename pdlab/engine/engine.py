"""The engine loop: add requests, then step (schedule -> execute -> update) until done."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Sequence

import torch

from pdlab.models.attention import resolve_attention_backend
from pdlab.engine.config import EngineConfig
from pdlab.models.kv_cache import KVCache
from pdlab.engine.memory import MemoryPlan
from pdlab.engine.model_runner import LaunchedStep, ModelRunner, PushPlan
from pdlab.engine.outputs import RequestOutput
from pdlab.engine.shared_weights import SharedWeights, export_weights, map_weights
from pdlab.errors import ConfigError, InvalidRequestError
from pdlab.models.config import ModelConfig
from pdlab.models.load import load_model, resolve_device, resolve_dtype
from pdlab.models.sharding import Shard
from pdlab.models.source import resolve_model
from pdlab.models.tokenizer import encode_chat
from pdlab.models.transformer import Transformer
from pdlab.policy import sizing
from pdlab.policy.block_manager import BlockManager
from pdlab.policy.request import Request
from pdlab.policy.scheduler import Scheduler, SchedulerConfig
from pdlab.sampling_params import SamplingParams

log = logging.getLogger("pdlab.engine")

CPU_KV_CACHE_BYTES = 512 << 20


def build_executor(config: EngineConfig, source, device: torch.device, dtype: torch.dtype, tp=None,
                   kv_cache_shm_path: str | None = None, shared_weights: SharedWeights | None = None,
                   ) -> tuple[Transformer, KVCache, ModelRunner, int]:
    """What every tensor-parallel rank holds: (its model shard, its KV cache, the runner, max_model_len).

    Every rank sizes its cache from its own memory; with tensor parallelism they
    agree on the smallest. The engine (rank 0) and `tp_worker` both call this.
    `shared_weights`: map another instance's weights on this GPU instead of loading them.
    """
    if config.cuda_graph_max_tokens < 0:
        raise ConfigError(f"cuda_graph_max_tokens must be >= 0, got {config.cuda_graph_max_tokens}")
    if shared_weights is None:
        model = load_model(source, dtype, device, config.seed, config.quantization, tp)
    else:
        model = map_weights(shared_weights, source.config, dtype, device, source.location, config.quantization)
    max_model_len = sizing.max_model_len(source.config.max_position_embeddings, config.max_model_len)
    plan = memory_plan(config, device, shared_weights)
    num_blocks = kv_cache_blocks(config, model.local_config, dtype, plan)
    if tp is not None:
        num_blocks = tp.agree_min(num_blocks)
    if num_blocks * config.block_size < max_model_len:
        what = f"one sequence of max_model_len={max_model_len} tokens"
        if plan is not None:
            need = KVCache.bytes_per_block(model.local_config, config.block_size, dtype) * -(-max_model_len // config.block_size)
            raise ConfigError(plan.too_small(need, what))
        raise ConfigError(f"the KV cache ({num_blocks} blocks of {config.block_size} tokens) cannot hold {what}: "
                          f"give it more memory or lower max_model_len")
    if plan is not None:
        log.info(plan.describe())
    graphs = device.type == "cuda" and not config.enforce_eager
    kv_cache = KVCache(model.local_config, num_blocks, config.block_size, dtype, device, kv_cache_shm_path,
                       scratch_block=graphs)
    runner = ModelRunner(model, kv_cache, config.attention_backend, tp)
    if graphs:
        budget = scheduler_config(config, max_model_len).max_num_batched_tokens
        runner.capture_graphs(config.max_num_seqs, max_model_len, min(budget, config.cuda_graph_max_tokens))
    return model, kv_cache, runner, max_model_len


def memory_plan(config: EngineConfig, device: torch.device, shared_weights: SharedWeights | None = None
                ) -> MemoryPlan | None:
    """This instance's share of its GPU, counted from its own allocations (None: not sized from GPU memory)."""
    if device.type != "cuda" or config.num_blocks is not None or config.kv_cache_memory_bytes is not None:
        return None
    if not 0 < config.gpu_memory_utilization <= 1:
        raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {config.gpu_memory_utilization}")
    free, total = torch.cuda.mem_get_info(device)
    return MemoryPlan(total_bytes=total, free_bytes=free, share=config.gpu_memory_utilization,
                      own_bytes=torch.cuda.memory_reserved(device),
                      mapped_bytes=shared_weights.num_bytes if shared_weights is not None else 0)


def kv_cache_blocks(config: EngineConfig, local_config: ModelConfig, dtype: torch.dtype,
                    plan: MemoryPlan | None = None) -> int:
    """KV blocks of `config.block_size` tokens this process's cache gets (its KV heads only): `num_blocks`,
    or what `kv_cache_memory_bytes`, the GPU memory `plan`, or the CPU default leaves."""
    if config.block_size <= 0:
        raise ConfigError(f"block_size must be > 0, got {config.block_size}")
    if config.num_blocks is not None:
        return config.num_blocks
    budget = config.kv_cache_memory_bytes
    if budget is None:
        budget = plan.kv_cache_bytes if plan is not None else CPU_KV_CACHE_BYTES
    return KVCache.num_blocks_for_budget(local_config, config.block_size, dtype, budget)


def scheduler_config(config: EngineConfig, max_model_len: int) -> SchedulerConfig:
    try:
        return sizing.scheduler_config(config.max_num_seqs, config.max_num_batched_tokens,
                                       config.enable_chunked_prefill, max_model_len)
    except ValueError as e:
        raise ConfigError(f"engine config: {e}") from None


class LLMEngine:
    def __init__(
        self, config: EngineConfig, clock: Callable[[], float] = time.monotonic, kv_cache_shm_path: str | None = None,
        shared_weights: SharedWeights | None = None,
    ) -> None:
        """Load the model and size the KV cache (this reads weight files and allocates memory).

        `kv_cache_shm_path` puts a CPU KV cache in that shared-memory file (the
        decode side of the `ipc` transport on a machine without GPUs).
        `shared_weights` (from another instance's `export_weights`, on the same GPU):
        map that instance's weights instead of loading a copy. With
        `tensor_parallel_size` > 1 this process is rank 0 and starts the others
        (pdlab/models/parallel.py); `close` stops them.
        """
        self.config = config
        self.clock = clock
        self.source = resolve_model(config.model)
        self.model_config = self.source.config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        resolve_attention_backend(config.attention_backend, self.device)  # a bad one fails before the weights load
        self.tokenizer = self.source.load_tokenizer()
        self.tp = None
        if not isinstance(config.tensor_parallel_size, int) or config.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be an integer >= 1, got {config.tensor_parallel_size!r}")
        if config.tensor_parallel_size > 1:
            from pdlab.models import parallel

            Shard(self.model_config, 0, config.tensor_parallel_size)  # a size the model cannot take fails now
            self.tp = parallel.start(config, self.device, kv_cache_shm_path)
            self.device = self.tp.device
        try:
            if shared_weights is not None and self.tp is not None:
                raise ConfigError("weights are shared between instances only without tensor parallelism")
            self.model, self.kv_cache, self.runner, max_model_len = build_executor(
                config, self.source, self.device, self.dtype, self.tp, kv_cache_shm_path, shared_weights)
            self.scheduler_config = scheduler_config(config, max_model_len)
        except BaseException:
            self.close()
            raise
        log.info("KV cache: %d blocks of %d tokens (%.2f GiB%s)", self.kv_cache.num_blocks, config.block_size,
                 self.kv_cache.num_bytes / 2**30, f" per rank, {config.tensor_parallel_size} ranks" if self.tp else "")
        self.block_manager = BlockManager(self.kv_cache.num_blocks, config.block_size)
        self.scheduler = Scheduler(self.scheduler_config, self.block_manager)
        self._seeds = random.Random(config.seed)
        self._next_id = 0
        self._logprobs: dict[str, list[dict[int, float]]] = {}
        self._in_flight: LaunchedStep | None = None  # async scheduling: the step queued, not yet collected
        if self.device.type == "cuda":
            self.warm_up()

    def warm_up(self) -> None:
        """Run the kinds of step serving runs (a full-budget prefill, a decode, a prefill chunk beside a
        decode) on throwaway requests, then drop them: Triton compiles each kernel variant on its first
        launch (seconds each), and the allocator grows its activation pool, before the first real request
        rather than inside it. Leaves the scheduler, the free blocks and the request seeds as they were."""
        start = time.perf_counter()
        c = self.scheduler_config
        vocab = self.model_config.vocab_size
        lengths = [max(1, min(c.max_num_batched_tokens, c.max_model_len - 2)), max(1, min(37, c.max_model_len - 2))]
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)  # the first decodes beside the second
        ids = []
        for i, n in enumerate(lengths):
            rid = f"warm-up-{i}"
            prompt = [(j * 7919 + i) % vocab for j in range(n)]
            self.scheduler.add(self.make_request(prompt, params, rid, 0.0, seed=0))
            ids.append(rid)
            for _ in range(-(-n // c.max_num_batched_tokens) + 1):  # its prefill, then a step beside the next
                self.step()
        self.drain()
        for rid in ids:
            self.scheduler.abort(rid, self.clock())
        self._logprobs.clear()
        log.info("warm-up steps: %.2f s", time.perf_counter() - start)

    def export_weights(self) -> SharedWeights:
        """What another instance on this GPU needs to map this one's weights (`shared_weights`)."""
        if self.tp is not None:
            raise ConfigError("weights are shared between instances only without tensor parallelism")
        return export_weights(self.model, self.source.location, self.config.quantization)

    def close(self) -> None:
        """Stop the other tensor-parallel ranks, if any (idempotent)."""
        if self.tp is not None:
            self.tp.close()
            self.tp = None

    # --- requests ------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation through the tokenizer's chat template, ready for the reply."""
        return encode_chat(self.tokenizer, messages)

    def make_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time_s: float | None = None,
        seed: int | None = None,
        output_token_ids: Sequence[int] = (),
    ) -> Request:
        """Validate a request and build its policy object; raises InvalidRequestError naming the problem.

        `output_token_ids`: tokens the request has already generated elsewhere (it resumes after
        the instance that served it failed); they count towards `max_tokens` and are recomputed
        with the prompt, and sampling goes on with the next output index.
        """
        params = params or SamplingParams()
        token_ids = self.encode_prompt(prompt)
        if not token_ids:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})")
        max_len = self.scheduler_config.max_model_len
        if len(token_ids) >= max_len:
            raise InvalidRequestError(
                f"the prompt has {len(token_ids)} tokens; this model's context (max_model_len) is {max_len}, "
                f"so prompts may have at most {max_len - 1}"
            )
        outputs = list(output_token_ids)
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in outputs):
            raise InvalidRequestError(f"output token ids must be integers in [0, {vocab})")
        if outputs and (len(outputs) >= params.max_tokens or len(token_ids) + len(outputs) >= max_len):
            raise InvalidRequestError(f"a resumed request has {len(outputs)} output tokens already: nothing is left "
                                      f"to generate within max_tokens={params.max_tokens} and max_model_len={max_len}")
        if request_id is None:
            request_id = str(self._next_id)
            self._next_id += 1
        if request_id in self.scheduler.requests or request_id in self.scheduler.held:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if seed is None:
            seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        return Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            params=params,
            arrival_time_s=self.clock() if arrival_time_s is None else arrival_time_s,
            eos_token_ids=tuple(self.tokenizer.eos_token_ids),
            seed=seed,
            output_token_ids=outputs,
        )

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        arrival_time_s: float | None = None,
    ) -> Request:
        """Validate and queue a request; raises InvalidRequestError naming the problem."""
        request = self.make_request(prompt, params, request_id, arrival_time_s)
        self.scheduler.add(request)
        return request

    def abort(self, request_id: str) -> RequestOutput | None:
        request = self.scheduler.abort(request_id, self.clock())
        return None if request is None else self.output(request)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def has_work(self) -> bool:
        """Whether `step` has anything to do: requests to schedule, or a step left running to collect."""
        return self.scheduler.has_work() or self._in_flight is not None

    # --- the loop ------------------------------------------------------------------

    def step(self, push_plan: PushPlan | None = None) -> list[RequestOutput]:
        """One iteration: schedule, execute, update. Returns outputs of requests that advanced.

        `push_plan(batch)`, when given, lists KV copies to make inside the forward
        pass, each layer right after its new KV is in the cache (a prefill instance
        starts that layer's transfer there; pdlab/engine/kv_io.py).

        With `async_scheduling` the step is left running on the device when this returns, and the next
        call first queues the step after it (`Scheduler.schedule_after`: every request one token or chunk
        further, waiting ones admitted; the ids of the tokens just sampled come from the device), then
        waits for the running step and returns its outputs. So each call returns the previous step's
        outputs while the GPU computes the next. Where the next step is not known yet (a request joined,
        blocks are short) it waits for the running step and schedules as usual; a step with KV pushes (a
        prefill instance's) and tensor-parallel steps always run this way.
        """
        overlap = self.config.async_scheduling and push_plan is None and self.tp is None
        running, self._in_flight = self._in_flight, None
        if running is not None and overlap:
            following = self.scheduler.schedule_after(running.batch)
            if following is not None:
                self._in_flight = self.runner.launch(following, after=running)
        outputs = self._collect(running) if running is not None else []
        if self._in_flight is None:
            batch = self.scheduler.schedule()
            if batch.items:
                launched = self.runner.launch(batch, push_plan)
                if overlap:
                    self._in_flight = launched
                else:
                    outputs += self._collect(launched)
        return outputs

    def drain(self) -> list[RequestOutput]:
        """Wait for the step left running by `async_scheduling`, if any, and return its outputs."""
        running, self._in_flight = self._in_flight, None
        return self._collect(running) if running is not None else []

    def _collect(self, step: LaunchedStep) -> list[RequestOutput]:
        """Wait for a launched step's tokens and apply them: the outputs of the requests that advanced."""
        out = self.runner.collect(step)
        for request_id, entry in out.logprobs.items():
            self._logprobs.setdefault(request_id, []).append(entry)
        touched = self.scheduler.update(step.batch, out.tokens, self.clock())
        self.apply_stop_strings(touched)
        return [self.output(r) for r in touched]

    def record_logprobs(self, request_id: str, entry: dict[int, float]) -> None:
        """Log-probabilities of a token sampled elsewhere (a prefill instance's first token)."""
        self._logprobs.setdefault(request_id, []).append(entry)

    def apply_stop_strings(self, requests: list[Request]) -> None:
        for request in requests:
            if request.params.stop and not request.is_finished:
                text = self.tokenizer.decode(request.output_token_ids)
                if any(s in text for s in request.params.stop):
                    self.scheduler.finish(request.request_id, "stop", request.token_times_s[-1])

    def output(self, request: Request) -> RequestOutput:
        text = self._text(request) if request.is_finished else ""
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=list(request.output_token_ids),
            text=text,
            finished=request.is_finished,
            finish_reason=request.finish_reason,
            arrival_time_s=request.arrival_time_s,
            first_token_time_s=request.first_token_time_s,
            token_times_s=list(request.token_times_s),
            finish_time_s=request.finish_time_s,
            num_preemptions=request.num_preemptions,
            logprobs=self._logprobs.pop(request.request_id, None) if request.is_finished else self._logprobs.get(request.request_id),
        )

    def _text(self, request: Request) -> str:
        """Decoded output, cut before the first stop string (or after it, if asked)."""
        ids = request.output_token_ids
        if request.finish_reason == "stop" and ids and (ids[-1] in request.eos_token_ids or ids[-1] in request.params.stop_token_ids):
            ids = ids[:-1]
        text = self.tokenizer.decode(ids)
        cuts = [(text.find(s), s) for s in request.params.stop if s in text]
        if cuts:
            index, stop = min(cuts)
            text = text[: index + len(stop)] if request.params.include_stop_str_in_output else text[:index]
        return text
