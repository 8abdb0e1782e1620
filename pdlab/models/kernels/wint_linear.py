"""Which kernel computes a wint8/wint4 linear for a batch of M rows, on this GPU.

The three kernels of wint_matmul.py win in different ranges of M, and where the ranges meet depends on
the shape and the card. benchmarks/wint_kernels.py times them all (CUDA graphs, weights from HBM) for
llama3-8b's linears at M = 1..2048 and writes the fastest kernel and tile configuration of each
(bits, N, K, M) to a table, `configs/wint_<card>.json` beside this module, which `choose` reads for the
card it runs on (the way vLLM keeps its fused-MoE tile choices per card). For an M between two measured
ones it takes the next measured M up; for a shape the table lacks, the table's shape nearest in size.
On a card without a table, the rule: `wint_gemv` up to GEMV_MAX_M rows, `wint_matmul` below
DEQUANT_MIN_M, dequantize + cuBLAS from there.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pdlab.models.kernels.wint_matmul import (
    GemvConfig, TileConfig, _num_sms, dequantize_weight, pick_config, pick_gemv_config, wint_gemv, wint_matmul,
)
from pdlab.models.quant import QuantizedWeight

GEMV_MAX_M = 1  # from 2 rows the MMA kernel wins (H100: 1.4-1.7x bf16 at M = 2-16, the no-loop one 1.3-1.4x at 2)
DEQUANT_MIN_M = 512
CONFIG_DIR = Path(__file__).with_name("configs")
KERNELS = ("gemv", "mma", "dequant")


@dataclass(frozen=True)
class Choice:
    kernel: str  # one of KERNELS
    config: GemvConfig | TileConfig | None = None


def table_path(device_name: str) -> Path:
    return CONFIG_DIR / f"wint_{re.sub(r'[^A-Za-z0-9]+', '_', device_name).strip('_')}.json"


Table = dict[tuple[int, int, int], list[tuple[int, Choice]]]  # (bits, N, K) -> [(M, choice)] sorted by M


def load_table(path: Path) -> Table:
    """A table written by benchmarks/wint_kernels.py; empty if there is none."""
    if not path.exists():
        return {}
    table: Table = {}
    for row in json.loads(path.read_text())["choices"]:
        config = row.get("config")
        if row["kernel"] == "gemv":
            config = GemvConfig(**config)
        elif row["kernel"] == "mma":
            config = TileConfig(**config)
        table.setdefault((row["bits"], row["n"], row["k"]), []).append((row["m"], Choice(row["kernel"], config)))
    return {key: sorted(rows, key=lambda r: r[0]) for key, rows in table.items()}


@functools.cache
def _card_table(device_name: str) -> Table:
    return load_table(table_path(device_name))


def rule(m: int, n: int, k: int, bits: int, group: int, num_sms: int) -> Choice:
    """The choice on a card without a table."""
    if m <= GEMV_MAX_M:
        return Choice("gemv", pick_gemv_config(m, n, k, bits, group))
    if m < DEQUANT_MIN_M:
        return Choice("mma", pick_config(m, n, k, bits, group, num_sms))
    return Choice("dequant")


def choose(m: int, n: int, k: int, bits: int, group: int, device: torch.device) -> Choice:
    """The kernel for m rows on `device`: its card's table, else the rule."""
    rows = _card_rows(_device_name(device), bits, n, k) if device.type == "cuda" else None
    return _pick(rows, m, n, k, bits, group, _num_sms(device))


def choose_from(table: Table, m: int, n: int, k: int, bits: int, group: int, num_sms: int) -> Choice:
    return _pick(_rows_of(table, bits, n, k), m, n, k, bits, group, num_sms)


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


@functools.cache
def _card_rows(device_name: str, bits: int, n: int, k: int) -> list[tuple[int, Choice]] | None:
    # Looked up once per linear's shape: the prefill steps that run eagerly call `choose` for every linear.
    return _rows_of(_card_table(device_name), bits, n, k)


def _rows_of(table: Table, bits: int, n: int, k: int) -> list[tuple[int, Choice]] | None:
    """The table's rows for the shape, else for its shape of the same bits nearest in size; None if it has none."""
    rows = table.get((bits, n, k))
    if rows is None:
        same_bits = [key for key in table if key[0] == bits]
        if same_bits:
            rows = table[min(same_bits, key=lambda key: abs(key[1] * key[2] - n * k))]
    return rows


def _pick(rows: list[tuple[int, Choice]] | None, m: int, n: int, k: int, bits: int, group: int,
          num_sms: int) -> Choice:
    if not rows:
        return rule(m, n, k, bits, group, num_sms)
    choice = next((c for measured_m, c in rows if measured_m >= m), rows[-1][1])
    c = choice.config
    if isinstance(c, GemvConfig) and c.block_k % group or isinstance(c, TileConfig) and group % c.block_k:
        return rule(m, n, k, bits, group, num_sms)  # the table was measured at another group size
    return choice


def wint_linear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None,
                choice: Choice | None = None) -> torch.Tensor:
    """x [..., K] -> [..., N] = x @ dequant(w).T + bias, by `choice` (default: `choose`'s for x's rows)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[-1] and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n, k = w.shape
    if choice is None:
        choice = Choice("dequant") if x.dtype == torch.float32 else choose(
            x2.shape[0], n, k, w.method.bits, w.group_size, x.device)
    if choice.kernel == "gemv":
        out = wint_gemv(x2, w, bias, config=choice.config)
    elif choice.kernel == "mma":
        out = wint_matmul(x2, w, bias, config=choice.config)
    else:
        out = F.linear(x2, dequantize_weight(w, x.dtype), bias)
    return out.view(*lead, out.shape[-1])
