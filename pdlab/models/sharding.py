"""Which part of each weight a tensor-parallel rank holds (Megatron-style column/row parallelism).

| weight | split | rank r holds |
|---|---|---|
| `qkv_proj`, `qkv_bias` | column (dim 0) | its query heads, its KV heads (q, k and v parts each cut) |
| `gate_up_proj` | column (dim 0) | its slice of the intermediate size (gate and up parts each cut) |
| `o_proj` | row (dim 1) | the columns of its query heads; the output is all-reduced |
| `down_proj` | row (dim 1) | the columns of its intermediate slice; the output is all-reduced |
| `embed_tokens`, `lm_head` | vocabulary (dim 0) | rows [r * V/tp, (r+1) * V/tp), the vocabulary padded to a multiple of tp |
| norms, `q_norm`/`k_norm` | none | everything |

KV heads: with tp dividing their number each rank holds num_kv_heads / tp
of them; with tp a multiple of it each KV head is replicated on tp /
num_kv_heads ranks (rank r holds head r // (tp / num_kv_heads)). Query heads
and the intermediate size must divide by tp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdlab.errors import ConfigError
from pdlab.models.config import ModelConfig


@dataclass(frozen=True)
class Shard:
    config: ModelConfig  # the whole model's shape
    rank: int
    size: int

    def __post_init__(self) -> None:
        c, tp = self.config, self.size
        problems = []
        if c.num_heads % tp:
            problems.append(f"{c.num_heads} attention heads")
        if c.num_kv_heads % tp and tp % c.num_kv_heads:
            problems.append(f"{c.num_kv_heads} KV heads (tp must divide them or be a multiple of them)")
        if c.intermediate_size % tp:
            problems.append(f"intermediate size {c.intermediate_size}")
        if problems:
            raise ConfigError(f"--tensor-parallel-size {tp} does not divide {c.name}'s {', '.join(problems)}")

    # --- the local shape ------------------------------------------------------------------

    @property
    def heads(self) -> range:
        n = self.config.num_heads // self.size
        return range(self.rank * n, (self.rank + 1) * n)

    @property
    def kv_heads(self) -> range:
        c, tp = self.config, self.size
        if c.num_kv_heads % tp == 0:
            n = c.num_kv_heads // tp
            return range(self.rank * n, (self.rank + 1) * n)
        head = self.rank // (tp // c.num_kv_heads)
        return range(head, head + 1)

    @property
    def intermediate(self) -> range:
        n = self.config.intermediate_size // self.size
        return range(self.rank * n, (self.rank + 1) * n)

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.config.vocab_size // self.size)

    @property
    def vocab(self) -> range:
        n = self.vocab_per_rank
        return range(self.rank * n, (self.rank + 1) * n)

    def local_config(self) -> ModelConfig:
        """The shape this rank computes with (its heads, KV heads, intermediate slice; hidden size whole)."""
        c = self.config
        return c.with_(num_heads=len(self.heads), num_kv_heads=len(self.kv_heads), head_dim=c.head_dim,
                       intermediate_size=len(self.intermediate))

    # --- taking the local part ------------------------------------------------------------

    def take_part(self, attr: str, part: int | None, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of one Hugging Face tensor: `part` indexes a merged weight's pieces
        (q, k, v of qkv; gate, up of gate_up), as `Transformer.load_weights` names them."""
        c = self.config
        d = c.head_dim
        if attr in ("qkv_proj", "qkv_bias"):
            heads = self.heads if part == 0 else self.kv_heads
            return full[heads.start * d: heads.stop * d]
        if attr == "gate_up_proj":
            return full[self.intermediate.start: self.intermediate.stop]
        if attr == "o_proj":
            return full[:, self.heads.start * d: self.heads.stop * d]
        if attr == "down_proj":
            return full[:, self.intermediate.start: self.intermediate.stop]
        if attr in ("embed_tokens", "lm_head"):
            rows = full[self.vocab.start: min(self.vocab.stop, c.vocab_size)]
            if rows.shape[0] < self.vocab_per_rank:  # the padding rows past the vocabulary: zeros
                pad = full.new_zeros(self.vocab_per_rank - rows.shape[0], *full.shape[1:])
                rows = torch.cat([rows, pad])
            return rows
        return full

    def take(self, attr: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of a whole merged parameter (as the unsharded model holds it)."""
        c = self.config
        if attr in ("qkv_proj", "qkv_bias"):
            q, k, v = full.split([c.q_size, c.kv_size, c.kv_size])
            return torch.cat([self.take_part(attr, i, t) for i, t in enumerate((q, k, v))])
        if attr == "gate_up_proj":
            return torch.cat([self.take_part(attr, i, t) for i, t in enumerate(full.chunk(2))])
        return self.take_part(attr, None, full)
