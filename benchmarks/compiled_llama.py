"""A gpt-fast-style baseline for decode speed: a plain Llama in PyTorch, one decode step compiled whole.

The way gpt-fast serves one batch: a static KV cache [B, H_kv, S, D] per layer
written at the step's position, SDPA over all S positions with a mask, the
step (forward pass and greedy pick) compiled by `torch.compile(mode=
"reduce-overhead", fullgraph=True)`, so Inductor fuses the small operations and
replays the whole step from one CUDA graph. No paging, no scheduler, no
sampling parameters: what a serving engine's step must get close to. Every
sequence of the batch sits at the same position (S is the context plus the
timed steps, so the masked tail is small).

    python benchmarks/compiled_llama.py --model llama3-8b --batches 1,8,32,64 --context 1024

`benchmarks/engine_speed.py --compiled` runs it in the same process as pdlab's engine, for ratios on
one card.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pdlab.models.config import ModelConfig  # noqa: E402
from pdlab.models.transformer import rope_inv_freq  # noqa: E402


class CompiledLlama(torch.nn.Module):
    def __init__(self, c: ModelConfig, batch: int, max_seq: int, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        e = dict(dtype=dtype, device="cuda")
        g = torch.Generator(device="cuda").manual_seed(0)

        def w(*shape: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.empty(*shape, **e).normal_(0, 0.02, generator=g), requires_grad=False)

        self.c = c
        self.embed = w(c.vocab_size, c.hidden_size)
        self.head = w(c.vocab_size, c.hidden_size)
        self.norm = torch.nn.Parameter(torch.ones(c.hidden_size, **e), requires_grad=False)
        self.layers = torch.nn.ModuleList()
        for _ in range(c.num_layers):
            layer = torch.nn.Module()
            layer.wqkv = w(c.q_size + 2 * c.kv_size, c.hidden_size)
            layer.wo = w(c.hidden_size, c.q_size)
            layer.w13 = w(2 * c.intermediate_size, c.hidden_size)
            layer.w2 = w(c.hidden_size, c.intermediate_size)
            layer.ln1 = torch.nn.Parameter(torch.ones(c.hidden_size, **e), requires_grad=False)
            layer.ln2 = torch.nn.Parameter(torch.ones(c.hidden_size, **e), requires_grad=False)
            layer.register_buffer("k", torch.randn(batch, c.num_kv_heads, max_seq, c.head_dim, **e) * 0.5)
            layer.register_buffer("v", torch.randn(batch, c.num_kv_heads, max_seq, c.head_dim, **e))
            self.layers.append(layer)
        self.register_buffer("inv_freq", rope_inv_freq(c).cuda())
        self.max_seq = max_seq

    def rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.c.rms_norm_eps)).to(x.dtype)

    @staticmethod
    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """ids [B]; pos: a 1-element tensor, the position every sequence is at. Returns the greedy tokens [B]."""
        c = self.c
        B = ids.shape[0]
        freqs = pos.float()[:, None] * self.inv_freq[None, :]  # [1, D/2]
        cos, sin = freqs.cos()[None], freqs.sin()[None]  # [1, 1, D/2]
        mask = (torch.arange(self.max_seq, device=ids.device) <= pos)[None, None, None, :]  # [1, 1, 1, S]
        x = F.embedding(ids, self.embed)  # [B, hidden]
        for layer in self.layers:
            q, k, v = F.linear(self.rms(x, layer.ln1), layer.wqkv).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
            q = self.rope(q.view(B, c.num_heads, c.head_dim), cos, sin)
            k = self.rope(k.view(B, c.num_kv_heads, c.head_dim), cos, sin)
            layer.k.index_copy_(2, pos, k[:, :, None])
            layer.v.index_copy_(2, pos, v.view(B, c.num_kv_heads, 1, c.head_dim))
            attn = F.scaled_dot_product_attention(q[:, :, None], layer.k, layer.v, attn_mask=mask, enable_gqa=True)
            x = x + F.linear(attn.reshape(B, c.q_size), layer.wo)
            gate, up = F.linear(self.rms(x, layer.ln2), layer.w13).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.w2)
        logits = F.linear(self.rms(x, self.norm), self.head)
        return logits.argmax(dim=-1)


@torch.no_grad()
def compiled_decode_ms(config: ModelConfig, batch: int, context: int, steps: int = 30) -> dict:
    """Median ms of a compiled decode step of `batch` sequences at `context` tokens, and the compile time."""
    model = CompiledLlama(config, batch, context + steps + 8)
    step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    ids = torch.randint(100, 30000, (batch,), device="cuda")
    start = time.perf_counter()
    for i in range(3):  # compiles, records the graph, replays it
        ids = step(ids, torch.tensor([context + i], device="cuda")).clone()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - start
    times = []
    for i in range(steps):
        pos = torch.tensor([context + 3 + i], device="cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        ids = step(ids, pos).clone()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    del model, step
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return {"batch": batch, "context": context, "step_ms": statistics.median(times[2:]) * 1e3,
            "compile_s": compile_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--context", type=int, default=1024)
    args = parser.parse_args()
    from pdlab.models.source import resolve_model

    config = resolve_model(args.model).config
    for batch in (int(b) for b in args.batches.split(",")):
        print(json.dumps(compiled_decode_ms(config, batch, args.context)), flush=True)


if __name__ == "__main__":
    main()
