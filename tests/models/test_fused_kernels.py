"""The per-layer fused kernels (pdlab/models/kernels/fused.py) against the PyTorch reference of the model.

On a GPU in bf16 and fp16; without one, in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) in fp16 and fp32. Fresh random inputs with odd sizes (non-power-of-two
hidden sizes, rows strided as the model's views are).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.models.triton_env import DEVICE, DTYPES  # first: skips this module without a GPU or the interpreter

# isort: split
from pdlab.models.kernels import fused
from pdlab.models.transformer import apply_rope, rms_norm


def close(out, ref):
    """Equal but for a rounding step of the dtype here and there (fused multiply-adds, summation order)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    eps = torch.finfo(ref.dtype).eps
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 * eps, atol=eps * ref.float().abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [96, 576])
def test_rms_norm_with_and_without_the_residual(dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(5, hidden, generator=gen).to(DEVICE, dtype)
    delta = torch.randn(5, hidden, generator=gen).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(DEVICE, dtype)
    close(fused.rms_norm(x, w, 1e-5), rms_norm(x, w, 1e-5))
    out, total = fused.rms_norm(delta, w, 1e-6, residual=x)
    assert torch.equal(total, x + delta)
    close(out, rms_norm(x + delta, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_rotates_q_and_k_and_stores_k_and_v_at_their_slots(dtype):
    gen = torch.Generator().manual_seed(3)
    T, H, H_kv, D, blocks, bs = 4, 6, 2, 32, 5, 4
    qkv = torch.randn(T, (H + 2 * H_kv) * D, generator=gen).to(DEVICE, dtype)  # the model's strided views
    q, k, v = (t.view(T, -1, D) for t in qkv.split([H * D, H_kv * D, H_kv * D], dim=-1))
    positions = torch.tensor([0, 7, 3, 12], dtype=torch.float32)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    freqs = (positions[:, None] * inv_freq[None, :]).to(DEVICE)
    cos, sin = freqs.cos(), freqs.sin()
    k_cache = torch.zeros(blocks, bs, H_kv, D, dtype=dtype, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([17, 2, 9, 10], dtype=torch.int64, device=DEVICE)
    q_out = fused.rope_and_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
    close(q_out, apply_rope(q, cos, sin))
    kc, vc = k_cache.view(-1, H_kv, D), v_cache.view(-1, H_kv, D)
    close(kc[slots], apply_rope(k, cos, sin))
    assert torch.equal(vc[slots], v)
    others = torch.ones(blocks * bs, dtype=torch.bool, device=DEVICE)
    others[slots] = False
    assert not kc[others].any() and not vc[others].any()  # nothing else written


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul_of_the_merged_projection(dtype):
    gen = torch.Generator().manual_seed(4)
    gate_up = (3 * torch.randn(3, 2 * 1500, generator=gen)).to(DEVICE, dtype)  # I = 1500: two tiles, ragged
    gate, up = gate_up.chunk(2, dim=-1)
    close(fused.silu_and_mul(gate_up), F.silu(gate) * up)
