"""wint8/wint4 weight-only quantization: error bounds, the packed layout, shape checks, `linear`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdlab.engine.config import QUANTIZATIONS
from pdlab.errors import ConfigError
from pdlab.models import quant
from pdlab.models.quant import METHODS, QuantizationError, QuantizedWeight, QuantMethod, linear, quant_method, quantize

WINT8, WINT4 = METHODS["wint8"], METHODS["wint4"]


def test_the_engine_config_names_exactly_the_methods():
    assert tuple(METHODS) == QUANTIZATIONS


@pytest.mark.parametrize("method", [WINT8, WINT4], ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_error_is_at_most_half_a_scale(method, dtype):
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(96, 384, generator=gen) * 0.05).to(dtype)
    q = quantize(w, method)
    assert q.scales.shape == (96, 3) and q.scales.dtype == torch.float32 and q.group_size == 128
    # Against the weight as given (its own dtype), in fp32: half a step, plus one fp32 ulp of q * s
    # (bf16 weights do hit exact ties, x.5, where the half step is used up entirely).
    err = (w.float() - q.dequantize(torch.float32)).abs().view(96, 3, 128)
    half_step = q.scales[:, :, None] / 2
    assert (err <= half_step + w.float().abs().view(96, 3, 128) * 2**-23).all()
    assert (err / half_step).max() > 0.9  # and it is tight: rounding uses up most of the half step somewhere
    values = q.int_values()
    assert values.min() >= -method.qmax and values.max() <= method.qmax
    # Each group's largest |w| maps to exactly +-qmax: the full range is used, nothing clipped.
    assert (values.view(96, 3, 128).abs().amax(-1) == method.qmax).all()
    assert q.dequantize().dtype == dtype and q.dequantize().shape == w.shape


def test_wint8_stores_the_integers_as_int8():
    s = 0.01
    ints = torch.tensor([[127, -127, 0, 1, -1, 64, -64, 5] * 4], dtype=torch.float32)  # one row, one group of 32
    q = quantize(ints * s, QuantMethod("wint8", 8, group_size=32))
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (1, 32)
    assert q.qweight.tolist() == ints.to(torch.int8).tolist()
    assert q.scales.item() == pytest.approx(s, rel=1e-6)


def test_wint4_packs_the_two_halves_of_each_group_into_one_byte():
    s = 0.5
    # One row, two groups of 32. Byte j of group g = (q[32g + j] + 8) | (q[32g + 16 + j] + 8) << 4.
    first = [1, 7, 0, 3] + [0] * 12 + [-1, -7, 0, -4] + [0] * 12
    second = [2] + [0] * 15 + [-3] + [0] * 14 + [7]
    q = quantize(torch.tensor([first + second], dtype=torch.float32) * s, QuantMethod("wint4", 4, group_size=32))
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (1, 32)
    assert q.qweight[0, :5].tolist() == [0x79, 0x1F, 0x88, 0x4B, 0x88]
    assert q.qweight[0, 16:].tolist() == [0x5A] + [0x88] * 14 + [0xF8]
    assert q.int_values()[0].tolist() == first + second
    assert q.scales[0].tolist() == [s, s]  # max |w| = 7 s maps to 7


def test_wint4_decodes_every_nibble_to_minus_8_through_7():
    every_byte = torch.arange(256, dtype=torch.uint8).view(1, 256)  # K = 512, 4 groups: all 16 x 16 nibble pairs
    w = QuantizedWeight(WINT4, every_byte, torch.ones(1, 4), (1, 512), torch.float32)
    values = w.int_values()[0].view(4, 2, 64)  # [group, half, j]
    assert values[:, 0].flatten().tolist() == [(b & 15) - 8 for b in range(256)]
    assert values[:, 1].flatten().tolist() == [(b >> 4) - 8 for b in range(256)]
    assert sorted(set(values.flatten().tolist())) == list(range(-8, 8))
    # ...but quantize never writes -8: the range is symmetric, [-7, 7].
    gen = torch.Generator().manual_seed(2)
    q = quantize(torch.randn(64, 256, generator=gen), WINT4).int_values()
    assert sorted(set(q.flatten().tolist())) == list(range(-7, 8))


def test_zero_groups_dequantize_to_zeros():
    w = torch.zeros(4, 256)
    w[1, 128:] = torch.linspace(-1, 1, 128)
    for method in (WINT8, WINT4):
        q = quantize(w, method)
        assert q.scales[0].tolist() == [0.0, 0.0] and q.scales[1, 0] == 0
        d = q.dequantize()
        assert torch.isfinite(d).all() and (d[0] == 0).all() and (d[1, :128] == 0).all()


def test_quantizing_in_row_slabs_changes_nothing(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(50, 256, generator=gen)
    whole = [quantize(w, m) for m in (WINT8, WINT4)]
    monkeypatch.setattr(quant, "_CHUNK_ELEMENTS", 3 * 256)  # three rows at a time, 17 slabs
    for m, ref in zip((WINT8, WINT4), whole):
        q = quantize(w, m)
        assert torch.equal(q.qweight, ref.qweight) and torch.equal(q.scales, ref.scales)


def test_shapes_that_do_not_fit_name_the_layer():
    with pytest.raises(QuantizationError, match=r"layers\.0\.qkv_proj: in_features 48 is a multiple of no power "
                                                r"of two from 32 to wint4's group size 128"):
        quantize(torch.randn(8, 48), WINT4, layer="layers.0.qkv_proj")
    with pytest.raises(QuantizationError, match=r"down: in_features 1000 is a multiple of no power of two"):
        quantize(torch.randn(8, 1000), WINT8, layer="down")
    with pytest.raises(QuantizationError, match="2-d floating-point"):
        quantize(torch.randn(8, 4, 32), WINT8)
    with pytest.raises(QuantizationError, match="inf or nan"):
        quantize(torch.tensor([[float("inf")] + [0.0] * 127]), WINT8, layer="o")
    # A row shorter than a group is one group (the tiny test presets have K = 64); a row that is no multiple of
    # the group takes the largest power of two that divides it (SmolLM2's 576 and 1536: 64 and 128).
    assert quantize(torch.randn(8, 64), WINT4).group_size == 64
    assert [quantize(torch.randn(8, k), WINT4).group_size for k in (576, 1536, 160, 4096)] == [64, 128, 32, 128]
    w = torch.randn(8, 576)
    assert (quantize(w, WINT4).dequantize() - w).abs().max() <= w.abs().max() / 7 / 2 + 1e-6
    with pytest.raises(ValueError, match="power of two"):
        QuantMethod("wint4", 4, group_size=100)


def test_unknown_method_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match="unknown quantization 'int3'.*wint8, wint4"):
        quant_method("int3")
    assert quant_method("wint4") is WINT4


def test_quantized_bytes():
    q8, q4 = quantize(torch.randn(256, 1024), WINT8), quantize(torch.randn(256, 1024), WINT4)
    scales = 256 * 8 * 4
    assert (q8.nbytes, q4.nbytes) == (256 * 1024 + scales, 256 * 512 + scales)


def test_linear_takes_plain_and_quantized_weights():
    gen = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(3, 5, 128, generator=gen), torch.randn(40, 128, generator=gen), torch.randn(40, generator=gen)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    for method in (WINT8, WINT4):
        q = quantize(w, method)
        torch.testing.assert_close(linear(x, q, b), F.linear(x, q.dequantize(), b))
        assert linear(x, q).shape == (3, 5, 40)
