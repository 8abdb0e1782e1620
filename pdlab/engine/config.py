"""Engine configuration: frozen, no I/O at construction; derived values are resolved by the engine."""

from __future__ import annotations

from dataclasses import dataclass

# Weight-only quantization methods (pdlab/models/quant.py's METHODS; a test keeps the two equal).
# Named here too so that flags and configs validate without importing torch.
QUANTIZATIONS = ("wint8", "wint4")


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda when available, else cpu
    block_size: int = 16
    # KV cache size: `num_blocks` when set; else `kv_cache_memory_bytes`; else on
    # CUDA `gpu_memory_utilization` of the card minus what weights and
    # activations take, and on CPU 512 MiB.
    num_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None  # 2048 with chunked prefill, else max_model_len
    enable_chunked_prefill: bool = True
    max_model_len: int | None = None  # the model's context, capped at 8192
    seed: int = 0
    # Weight-only quantization of the transformer's linears: None, "wint8" or "wint4" (FastDeploy's
    # --quantization); the embedding, lm_head and norms stay in `dtype`. Anything else is a
    # ConfigError when the engine loads the model (pdlab.models.load.load_model).
    quantization: str | None = None
    attention_backend: str = "auto"  # auto: triton on CUDA, torch elsewhere; or "torch", "triton"
    # GPUs (processes) one instance shards its weights and KV heads over; rank r uses cuda:r.
    tensor_parallel_size: int = 1
    # Run every step eagerly. Otherwise, on CUDA, steps replay CUDA graphs captured at start-up
    # (pdlab/engine/cuda_graphs.py): decode steps whole, for a set of batch sizes; steps with
    # prefill chunks of up to `cuda_graph_max_tokens` tokens piece by piece around attention
    # (0: those steps run eagerly).
    enforce_eager: bool = False
    cuda_graph_max_tokens: int = 1024
    # Queue the next decode step on the device before the host has the tokens of the one running
    # (`LLMEngine.step`): the host's work (outputs, scheduling, inputs) hides behind the GPU's. A request
    # that stops on a token (EOS, a stop token or string) still had its next step computed, thrown away.
    async_scheduling: bool = False
