"""One decoder-only dense transformer for the Llama 2/3, Qwen2/2.5/3, Mistral and SmolLM2 families.

Weights live in merged matrices (q, k and v in one `qkv_proj`, gate and up in
one `gate_up_proj`) so that a decode step reads each layer in few, large
matmuls; `load_weights` takes Hugging Face names and fills the right slice.
Attention over the paged KV cache is delegated to `ctx.attention` (see
pdlab/models/attention.py), so a faster kernel slots in without touching this
file. The functions here are the PyTorch reference; with the triton attention
backend, RMSNorm, RoPE with the KV store, and SiLU-and-multiply each run as one
kernel (pdlab/models/kernels/fused.py) instead of a handful of PyTorch ones.

The four linears of a layer (qkv_proj, o_proj, gate_up_proj, down_proj) go
through `pdlab.models.quant.linear`, so each may be a plain Parameter or a
`QuantizedWeight` (wint8/wint4, `Transformer.quantize_`); the embedding table,
lm_head, norms and biases are never quantized.

With tensor parallelism (`tp`, pdlab/models/parallel.py) the model holds one
rank's shard (pdlab/models/sharding.py): its layers compute with the local
shape, o_proj and down_proj outputs are all-reduced, the embedding is
vocabulary-parallel (all-reduced) and the logits are all-gathered. Loading
and random initialisation take each rank's part of the very weights the
whole model gets, so every tensor-parallel size computes the same function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pdlab.models.config import ModelConfig, RopeScaling
from pdlab.models.quant import QuantizedWeight, QuantMethod, linear, quantize
from pdlab.models.sharding import Shard

if TYPE_CHECKING:
    from pdlab.models.attention import AttentionContext
    from pdlab.models.parallel import TensorParallel


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 and cast back before scaling, as the reference implementations do.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def fused_kernels(ctx: AttentionContext) -> ModuleType | None:
    """pdlab/models/kernels/fused.py when the step runs the triton backend (one launch for each of RMSNorm,
    RoPE with the KV store, and SiLU-and-multiply); None for the PyTorch reference path here."""
    if ctx.backend != "triton":
        return None
    from pdlab.models.kernels import fused

    return fused


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if config.rope_scaling is not None:
        inv_freq = _llama3_scale(inv_freq, config.rope_scaling)
    return inv_freq.float()


def _llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    middle = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(middle, blended, out)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]; cos, sin: [T, D/2]. Rotates the two halves of each head (HF layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


# The weights `quantize_` replaces; everything else keeps the model dtype.
QUANTIZED_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, dtype: torch.dtype, device: torch.device,
                 reduce: Callable[[torch.Tensor], torch.Tensor] = _identity) -> None:
        """`config`: the shape this layer computes with (a tensor-parallel rank's local one); `reduce`
        sums the row-parallel outputs over the ranks."""
        super().__init__()
        c = config
        self.config = c
        self.layer_idx = layer_idx
        self.reduce = reduce
        e = dict(dtype=dtype, device=device)
        self.input_layernorm = nn.Parameter(torch.ones(c.hidden_size, **e))
        self.qkv_proj = nn.Parameter(torch.empty(c.q_size + 2 * c.kv_size, c.hidden_size, **e))
        self.qkv_bias = nn.Parameter(torch.zeros(c.q_size + 2 * c.kv_size, **e)) if c.attention_bias else None
        self.q_norm = nn.Parameter(torch.ones(c.head_dim, **e)) if c.qk_norm else None
        self.k_norm = nn.Parameter(torch.ones(c.head_dim, **e)) if c.qk_norm else None
        self.o_proj = nn.Parameter(torch.empty(c.hidden_size, c.q_size, **e))
        self.post_attention_layernorm = nn.Parameter(torch.ones(c.hidden_size, **e))
        self.gate_up_proj = nn.Parameter(torch.empty(2 * c.intermediate_size, c.hidden_size, **e))
        self.down_proj = nn.Parameter(torch.empty(c.hidden_size, c.intermediate_size, **e))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        return self.post(x, ctx.attend(self.layer_idx, self.pre(x, cos, sin, ctx)), ctx)

    def pre(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """The layer up to attention: stores this step's K and V in the cache; returns the rotated queries
        [T, num_heads, head_dim]. Only `ctx.backend`, `ctx.kv_cache` and `ctx.slot_mapping` are read, so it
        can be captured in a CUDA graph (pdlab/engine/cuda_graphs.py)."""
        c = self.config
        T = x.shape[0]
        fused = fused_kernels(ctx)
        eps = c.rms_norm_eps
        h = fused.rms_norm(x, self.input_layernorm, eps) if fused else rms_norm(x, self.input_layernorm, eps)
        qkv = linear(h, self.qkv_proj, self.qkv_bias)  # [T, q_size + 2 * kv_size]
        q, k, v = qkv.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = q.view(T, c.num_heads, c.head_dim)
        k = k.view(T, c.num_kv_heads, c.head_dim)
        v = v.view(T, c.num_kv_heads, c.head_dim)
        if self.q_norm is not None:
            q = rms_norm(q, self.q_norm, eps)
            k = rms_norm(k, self.k_norm, eps)
        if fused:  # rotate q and k and store k and v in one launch
            k_cache, v_cache = ctx.kv_cache.layer(self.layer_idx)
            return fused.rope_and_store_kv(q, k, v, cos, sin, k_cache, v_cache, ctx.slot_mapping)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        ctx.store_kv(self.layer_idx, k, v)
        return q

    def post(self, x: torch.Tensor, attn: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """The layer from attention's output [T, num_heads, head_dim] on: the residual stream x after it
        (reads only `ctx.backend`)."""
        c = self.config
        fused = fused_kernels(ctx)
        eps = c.rms_norm_eps
        delta = self.reduce(linear(attn.reshape(x.shape[0], c.q_size), self.o_proj))
        if fused:
            h, x = fused.rms_norm(delta, self.post_attention_layernorm, eps, residual=x)
            act = fused.silu_and_mul(linear(h, self.gate_up_proj))
        else:
            x = x + delta
            h = rms_norm(x, self.post_attention_layernorm, eps)
            gate, up = linear(h, self.gate_up_proj).chunk(2, dim=-1)
            act = F.silu(gate) * up
        return x + self.reduce(linear(act, self.down_proj))

    @torch.no_grad()
    def quantize_(self, method: QuantMethod) -> None:
        """Replace this layer's linear weights by `QuantizedWeight`s (buffers of a submodule each).

        All four are quantized before any Parameter is dropped: the quantized
        tensors are allocated while the layer's own matrices are still held,
        so on CUDA they cannot be carved out of (and pin) this layer's blocks,
        which the caching allocator may then reuse whole or release. Extra
        memory: one layer's quantized copy plus ~64 MiB of fp32 temporaries.
        QuantizationError naming the weight (`layers.3.down_proj`) when a
        shape does not fit the method; the layer is then left as it was.
        """
        quantized = {}
        for name in QUANTIZED_LINEARS:
            weight = getattr(self, name)
            if isinstance(weight, QuantizedWeight):
                raise ValueError(f"layers.{self.layer_idx}.{name} is already quantized ({weight.method.name})")
            quantized[name] = quantize(weight.detach(), method, layer=f"layers.{self.layer_idx}.{name}")
        for name, q in quantized.items():
            delattr(self, name)  # the Parameter goes; the QuantizedWeight registers as a submodule
            setattr(self, name, q)


# Hugging Face name suffix -> (our parameter, shard index into the merged matrix or None).
_LAYER_NAMES = {
    "input_layernorm.weight": ("input_layernorm", None),
    "self_attn.q_proj.weight": ("qkv_proj", 0),
    "self_attn.k_proj.weight": ("qkv_proj", 1),
    "self_attn.v_proj.weight": ("qkv_proj", 2),
    "self_attn.q_proj.bias": ("qkv_bias", 0),
    "self_attn.k_proj.bias": ("qkv_bias", 1),
    "self_attn.v_proj.bias": ("qkv_bias", 2),
    "self_attn.q_norm.weight": ("q_norm", None),
    "self_attn.k_norm.weight": ("k_norm", None),
    "self_attn.o_proj.weight": ("o_proj", None),
    "post_attention_layernorm.weight": ("post_attention_layernorm", None),
    "mlp.gate_proj.weight": ("gate_up_proj", 0),
    "mlp.up_proj.weight": ("gate_up_proj", 1),
    "mlp.down_proj.weight": ("down_proj", None),
}


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 tp: TensorParallel | None = None) -> None:
        """`config`: the whole model's shape; with `tp`, this rank's shard of it is built."""
        super().__init__()
        device = torch.device(device)
        self.config = config
        self.dtype = dtype
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.shard = Shard(config, self.tp.rank, self.tp.size) if self.tp is not None else None
        local = self.shard.local_config() if self.shard is not None else config
        reduce = self.tp.all_reduce if self.tp is not None else _identity
        vocab_rows = self.shard.vocab_per_rank if self.shard is not None else config.vocab_size
        e = dict(dtype=dtype, device=device)
        self.embed_tokens = nn.Parameter(torch.empty(vocab_rows, config.hidden_size, **e))
        self.layers = nn.ModuleList(DecoderLayer(local, i, dtype, device, reduce) for i in range(config.num_layers))
        self.norm = nn.Parameter(torch.ones(config.hidden_size, **e))
        self.lm_head = None if config.tie_word_embeddings else nn.Parameter(torch.empty(vocab_rows, config.hidden_size, **e))
        inv_freq = rope_inv_freq(config).to(device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def local_config(self) -> ModelConfig:
        """The shape this process computes with: its KV heads are what its KV cache holds."""
        return self.shard.local_config() if self.shard is not None else self.config

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """input_ids, positions: [T] (all scheduled tokens, flattened). Returns hidden states [T, hidden]."""
        cos, sin = self.rope(positions)
        x = self.embed(input_ids)  # [T, hidden]
        for layer in self.layers:
            x = layer(x, cos, sin, ctx)
        return self.final_norm(x, ctx)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, head_dim / 2] (fp32) of each position's rotation."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        return freqs.cos(), freqs.sin()

    def final_norm(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        fused = fused_kernels(ctx)
        eps = self.config.rms_norm_eps
        return fused.rms_norm(x, self.norm, eps) if fused else rms_norm(x, self.norm, eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.shard is None:
            return F.embedding(input_ids, self.embed_tokens)
        # Vocabulary-parallel: each rank looks up the ids in its rows (zeros elsewhere); the sum is the row.
        local = input_ids - self.shard.vocab.start
        inside = (local >= 0) & (local < self.shard.vocab_per_rank)
        x = F.embedding(local.clamp(0, self.shard.vocab_per_rank - 1), self.embed_tokens) * inside[:, None]
        return self.tp.all_reduce(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> float32 logits [N, vocab] (every tensor-parallel rank must call it)."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        logits = F.linear(hidden, head)  # [N, vocab rows here]
        if self.shard is not None:
            logits = self.tp.all_gather_last(logits)[:, : self.config.vocab_size]
        return logits.float()

    # --- weights -----------------------------------------------------------------

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face-named tensors into the merged parameters.

        Raises ValueError naming the tensor when a name is unknown, a shape is
        wrong, or a parameter was never filled.
        """
        filled: set[str] = set()
        for name, tensor in weights:
            param, attr, shard = self._target(name)
            if param is None:
                continue
            if isinstance(param, QuantizedWeight):
                raise ValueError(f"weight {name}: the model is already quantized; load weights before quantize_")
            dest = param if shard is None else self._shard(param, attr, shard)
            if self.shard is not None:
                tensor = self.shard.take_part(attr, shard, tensor)
            if dest.shape != tensor.shape:
                raise ValueError(f"weight {name}: shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}")
            dest.copy_(tensor)
            filled.add(f"{id(param)}:{shard}")
        missing = [n for n, p in self.named_parameters() for s in self._shards_of(n, p) if f"{id(p)}:{s}" not in filled]
        if missing:
            raise ValueError(f"checkpoint lacks weights for {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    def _target(self, name: str) -> tuple[nn.Parameter | None, str | None, int | None]:
        if name == "model.embed_tokens.weight":
            return self.embed_tokens, "embed_tokens", None
        if name == "model.norm.weight":
            return self.norm, "norm", None
        if name == "lm_head.weight":
            # Some tied checkpoints still carry lm_head; the embedding table is the head then.
            return self.lm_head, "lm_head", None
        if name.startswith("model.layers."):
            index, suffix = name[len("model.layers."):].split(".", 1)
            if suffix in _LAYER_NAMES:
                attr, shard = _LAYER_NAMES[suffix]
                param = getattr(self.layers[int(index)], attr)
                if param is None:
                    raise ValueError(f"weight {name} does not fit this architecture ({self.config.name})")
                return param, attr, shard
            if "rotary_emb" in suffix:
                return None, None, None
        raise ValueError(f"unexpected weight {name!r} in checkpoint")

    def _shard(self, param: torch.Tensor, attr: str, shard: int) -> torch.Tensor:
        c = self.local_config
        sizes = [c.intermediate_size] * 2 if attr == "gate_up_proj" else [c.q_size, c.kv_size, c.kv_size]
        offset = sum(sizes[:shard])
        return param[offset: offset + sizes[shard]]

    def _shards_of(self, name: str, param: torch.Tensor) -> list[int | None]:
        if name.endswith(("qkv_proj", "qkv_bias")):
            return [0, 1, 2]
        if name.endswith("gate_up_proj"):
            return [0, 1]
        return [None]

    @torch.no_grad()
    def init_random(self, seed: int, std: float = 0.02, quantization: QuantMethod | None = None,
                    device: str | torch.device | None = None) -> None:
        """Random weights for presets: normal(0, std) matrices, unit norms, zero biases.

        One seeded generator draws every matrix in parameter order (the
        model's own tensors, then layer by layer), so a quantized model is the
        quantization of the very weights the unquantized one gets. With
        `quantization`, each layer is quantized right after its draw. A model
        built on the meta device is materialized on `device` one layer at a
        time, so its peak is the quantized model plus one layer in the model
        dtype.
        """
        if self.device.type == "meta":
            if device is None:
                raise ValueError("a model on the meta device needs the device to materialize it on")
            self.to_empty(device=device, recurse=False)  # embedding, final norm, lm_head
            self.inv_freq = rope_inv_freq(self.config).to(device)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        # A tensor-parallel shard draws each whole matrix, as the whole model does, and keeps its part.
        whole = Transformer(self.config, self.dtype, device="meta") if self.shard is not None else None
        _fill_random(self.named_parameters(recurse=False), generator, std, self.shard,
                     whole and dict(whole.named_parameters(recurse=False)))
        for i, layer in enumerate(self.layers):
            if layer.qkv_proj.device.type == "meta":
                layer.to_empty(device=self.device)
            _fill_random(layer.named_parameters(), generator, std, self.shard,
                         whole and dict(whole.layers[i].named_parameters()))
            if quantization is not None:
                layer.quantize_(quantization)

    @torch.no_grad()
    def quantize_(self, method: QuantMethod) -> None:
        """Quantize every layer's linears in place, layer by layer (see `DecoderLayer.quantize_`).

        Each layer's matrices are freed once it is quantized, so the peak is
        the unquantized model plus one layer's quantized copy. The embedding,
        lm_head and norms stay as they are.
        """
        for layer in self.layers:
            layer.quantize_(method)

    def linear_weight_bytes(self) -> int:
        """Bytes held by the layers' linear weights (quantized or not): what quantization shrinks."""
        total = 0
        for layer in self.layers:
            for name in QUANTIZED_LINEARS:
                w = getattr(layer, name)
                total += w.nbytes if isinstance(w, QuantizedWeight) else w.numel() * w.element_size()
        return total


def _fill_random(params: Iterable[tuple[str, nn.Parameter]], generator: torch.Generator, std: float,
                 shard: Shard | None = None, whole: dict[str, nn.Parameter] | None = None) -> None:
    for name, param in params:
        if param.dim() >= 2 and shard is not None:
            full = torch.empty(whole[name].shape, dtype=param.dtype, device=param.device)
            param.copy_(shard.take(name, full.normal_(0.0, std, generator=generator)))
        elif param.dim() >= 2:
            param.normal_(0.0, std, generator=generator)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.fill_(1.0)
