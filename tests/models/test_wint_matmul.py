"""The wint8/wint4 Triton kernels against the reference x @ dequantize(w).T.

On a GPU they run for real (bf16, fp16); without one, in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before anything imports a kernel;
fp16 and fp32 only, bf16 is wrong there). Shapes are small and ragged: N is
no multiple of any N tile and M crosses the 16/32/64 tile edges.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.models.triton_env import DEVICE, DTYPES, ON_GPU  # first: skips this module without a GPU or the interpreter

# isort: split
from pdlab.models.kernels import wint_linear as wl
from pdlab.models.kernels import wint_matmul as wm
from pdlab.models.quant import METHODS, QuantMethod, quantize

# Relative tolerance: the output's rounding (fp32 accumulation in both).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
METHOD_IDS = ["wint8", "wint4"]


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the kernels allocate starts as NaN: an element they fail to write shows."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(wm.torch, "empty", empty)


def make(method: QuantMethod, m: int, n: int, k: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = quantize((torch.randn(n, k, generator=gen) * 0.05).to(DEVICE), method)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    bias = torch.randn(n, generator=gen).to(DEVICE, dtype)
    return x, w, bias


def reference(x, w, bias=None) -> torch.Tensor:
    out = x.float() @ w.dequantize(torch.float32).T
    return out if bias is None else out + bias.float()


def assert_matches(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), "some outputs were never written"
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("m", [1, 3, 16, 33, 64, 300])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHOD_IDS)
def test_fused_kernel_matches_the_reference(poisoned, method, dtype, m):
    x, w, bias = make(METHODS[method], m, 72, 256, dtype, seed=m)  # N = 72: no multiple of 32, 64 or 128
    assert_matches(wm.wint_matmul(x, w, bias), reference(x, w, bias), dtype)
    assert_matches(wm.wint_matmul(x, w), reference(x, w), dtype)


@pytest.mark.parametrize("split_k", [3, 5])
@pytest.mark.parametrize("method", METHOD_IDS)
def test_split_k_sums_every_part_once(poisoned, method, split_k):
    dtype = DTYPES[0]
    x, w, bias = make(METHODS[method], 5, 40, 384, dtype, seed=split_k)
    # 12 K tiles of 32 (four per group of 128) over 3 or 5 programs; the last part is shorter for 5.
    config = wm.TileConfig(block_m=16, block_n=32, block_k=32, split_k=split_k)
    assert_matches(wm.wint_matmul(x, w, bias, config=config), reference(x, w, bias), dtype)
    assert_matches(wm.wint_matmul(x, w, config=config), reference(x, w), dtype)


@pytest.mark.parametrize("method", METHOD_IDS)
def test_the_default_config_splits_k_for_one_row(poisoned, method):
    dtype = DTYPES[0]
    x, w, bias = make(METHODS[method], 1, 40, 1024, dtype, seed=7)
    assert wm.pick_config(1, 40, 1024, w.method.bits, 128, wm.INTERPRETER_NUM_SMS).split_k > 1
    assert_matches(wm.wint_matmul(x, w, bias), reference(x, w, bias), dtype)


@pytest.mark.parametrize("m", [1, 2, 5, 16])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHOD_IDS)
def test_no_loop_kernel_matches_the_reference(poisoned, method, dtype, m):
    # N = 72 ragged against every N tile; K = 640: five groups, so a chunk of two or four groups overhangs K.
    x, w, bias = make(METHODS[method], m, 72, 640, dtype, seed=20 + m)
    for config in (None, wm.GemvConfig(8, 128), wm.GemvConfig(32, 256, 8), wm.GemvConfig(16, 512, 2)):
        assert_matches(wm.wint_gemv(x, w, bias, config=config), reference(x, w, bias), dtype)
        assert_matches(wm.wint_gemv(x, w, config=config), reference(x, w), dtype)
    assert_matches(wm.wint_gemv(x, w, config=wm.GemvConfig(8, 1024)), reference(x, w), dtype)  # one chunk: no split


@pytest.mark.parametrize("method", METHOD_IDS)
def test_a_group_of_64_rows_narrower_than_128(poisoned, method):
    dtype = DTYPES[0]
    x, w, bias = make(METHODS[method], 3, 48, 64, dtype, seed=8)  # the tiny presets' K = 64: one group per row
    assert w.group_size == 64
    assert_matches(wm.wint_matmul(x, w, bias), reference(x, w, bias), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHOD_IDS)
def test_the_dequantize_kernel_gives_the_reference_values(poisoned, method, dtype):
    _, w, _ = make(METHODS[method], 1, 72, 384, dtype, seed=9)
    assert torch.equal(wm.dequantize_weight(w, dtype), w.dequantize(dtype))


@pytest.mark.parametrize("kernel", wl.KERNELS)
@pytest.mark.parametrize("method", METHOD_IDS)
def test_wint_linear_runs_each_kernel_on_leading_dims(poisoned, method, kernel):
    dtype = DTYPES[0] if DTYPES[0] != torch.float32 else torch.float16
    x, w, bias = make(METHODS[method], 6, 40, 256, dtype, seed=10)
    out = wl.wint_linear(x.view(2, 3, 256), w, bias, choice=wl.Choice(kernel))  # leading dims flattened, restored
    assert out.shape == (2, 3, 40)
    assert_matches(out.view(6, 40), reference(x, w, bias), dtype)


def test_the_rule_picks_the_kernel_by_rows():
    kernels = [wl.rule(m, 4096, 4096, 4, 128, 132).kernel for m in (1, wl.GEMV_MAX_M + 1, wl.DEQUANT_MIN_M)]
    assert kernels == ["gemv", "mma", "dequant"]


def test_a_cards_table_gives_the_next_measured_m_up_and_the_nearest_shape(tmp_path):
    rows = [{"bits": 4, "n": 4096, "k": 4096, "m": m, "kernel": kernel, "config": config} for m, kernel, config in (
        (1, "gemv", {"block_n": 8, "block_k": 1024, "num_warps": 4}),
        (16, "mma", {"block_m": 16, "block_n": 64, "block_k": 128, "split_k": 4, "num_warps": 4, "num_stages": 3}),
        (512, "dequant", None))]
    path = tmp_path / "wint_card.json"
    path.write_text(json.dumps({"device": "card", "choices": rows}))
    table = wl.load_table(path)
    pick = [wl.choose_from(table, m, 4096, 4096, 4, 128, 132) for m in (1, 2, 16, 17, 4000)]
    assert [c.kernel for c in pick] == ["gemv", "mma", "mma", "dequant", "dequant"]
    assert pick[0].config == wm.GemvConfig(8, 1024, 4) and pick[1].config.split_k == 4
    assert wl.choose_from(table, 1, 1024, 2048, 4, 128, 132).kernel == "gemv"  # nearest shape of the same bits
    assert wl.choose_from(table, 1, 4096, 4096, 8, 128, 132) == wl.rule(1, 4096, 4096, 8, 128, 132)  # no wint8 rows
    assert wl.choose_from(table, 1, 4096, 4096, 4, 2048, 132).kernel == "gemv"  # block_k 1024 cannot hold a group
    assert wl.choose_from(table, 1, 4096, 4096, 4, 2048, 132).config == wm.pick_gemv_config(1, 4096, 4096, 4, 2048)
    assert wl.load_table(tmp_path / "absent.json") == {}


@pytest.mark.parametrize("m", [1, 16, 33, 64])
@pytest.mark.parametrize("bits", [8, 4])
def test_small_batches_read_each_weight_byte_once_with_the_gpu_filled(m, bits):
    num_sms = 132
    for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:  # llama3-8b's merged linears
        c = wm.pick_config(m, n, k, bits, 128, num_sms)
        assert 128 % c.block_k == 0 and c.block_m >= m  # one M tile: no weight tile is loaded twice
        tiles, weight_bytes = k // c.block_k, n * k * bits // 8
        workspace_traffic = 2 * c.split_k * m * n * 4  # fp32 partials written, then read back
        assert c.split_k == 1 or workspace_traffic <= weight_bytes // 2
        if -(-n // c.block_n) * c.split_k < wm.TARGET_WAVES * num_sms:  # too few programs: K could not split more
            assert tiles // (2 * c.split_k) < wm.MIN_TILES_PER_SPLIT or 2 * workspace_traffic > weight_bytes // 2


def test_bad_inputs_are_refused():
    x, w, _ = make(METHODS["wint8"], 2, 40, 256, DTYPES[0], seed=11)
    with pytest.raises(ValueError, match=r"x must be \[M, 256\]"):
        wm.wint_matmul(x[:, :128], w)
    with pytest.raises(ValueError, match="does not fit group size 128"):
        wm.wint_matmul(x, w, config=wm.TileConfig(16, 32, 256))
    with pytest.raises(ValueError, match="bias must be"):
        wm.wint_matmul(x, w, torch.zeros(3, device=DEVICE, dtype=x.dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", METHOD_IDS)
def test_on_gpu_both_paths_of_wint_linear_on_a_real_shape(method):
    for m in (1, 7, 64, 200, 1024):
        x, w, bias = make(METHODS[method], m, 4096, 4096, torch.bfloat16, seed=m)
        assert_matches(wl.wint_linear(x, w, bias), reference(x, w, bias), torch.bfloat16)


@pytest.mark.parametrize("kernel", wl.KERNELS)
@pytest.mark.parametrize("method", METHOD_IDS)
def test_smollm2s_rows_of_576_in_groups_of_64(poisoned, method, kernel):
    dtype = DTYPES[0] if DTYPES[0] != torch.float32 else torch.float16
    x, w, bias = make(METHODS[method], 3, 40, 576, dtype, seed=30)
    assert w.group_size == 64
    assert_matches(wl.wint_linear(x, w, bias, choice=wl.Choice(kernel)), reference(x, w, bias), dtype)
