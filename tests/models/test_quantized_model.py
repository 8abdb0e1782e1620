"""A quantized Transformer: which tensors are quantized, how many bytes they take, how it is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pdlab.errors import ConfigError
from pdlab.models.config import ModelConfig
from pdlab.models.load import load_model
from pdlab.models.quant import METHODS, QuantizedWeight, quantize
from pdlab.models.source import ModelSource, resolve_model
from pdlab.models.transformer import QUANTIZED_LINEARS, DecoderLayer, Transformer

CPU = torch.device("cpu")
# K = 256 and 512: multiples of the group size 128, as in every real model.
WIDE = ModelConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_layers=3, num_heads=4, num_kv_heads=2,
                   name="wide")


def preset(config: ModelConfig) -> ModelSource:
    return ModelSource("preset", config.name, config)


@pytest.mark.parametrize("method", ["wint8", "wint4"])
def test_only_the_four_linears_are_quantized_and_the_rest_is_unchanged(method):
    plain = load_model(resolve_model("tiny-qwen2"), torch.float32, CPU, seed=5)  # tied embedding, q/k/v bias
    quantized = load_model(resolve_model("tiny-qwen2"), torch.float32, CPU, seed=5, quantization=method)
    params = dict(quantized.named_parameters())
    assert not any(name.endswith(QUANTIZED_LINEARS) for name in params)
    for name, p in plain.named_parameters():
        if name.endswith(QUANTIZED_LINEARS):
            layer, attr = name.split(".")[1], name.split(".")[2]
            q = getattr(quantized.layers[int(layer)], attr)
            assert isinstance(q, QuantizedWeight) and q.method is METHODS[method]
            # The same seed draws the same weights: the quantized model quantizes exactly them.
            ref = quantize(p.detach(), METHODS[method])
            assert torch.equal(q.qweight, ref.qweight) and torch.equal(q.scales, ref.scales), name
        else:
            assert isinstance(params[name], nn.Parameter) and torch.equal(params[name], p), name
    assert set(dict(quantized.named_buffers())) >= {f"layers.0.{n}.{b}" for n in QUANTIZED_LINEARS
                                                    for b in ("qweight", "scales")}


@pytest.mark.parametrize("method,ratio", [("wint8", (1 + 4 / 128) / 2), ("wint4", (0.5 + 4 / 128) / 2)])
def test_linear_weight_bytes_against_bfloat16(method, ratio):
    plain = load_model(preset(WIDE), torch.bfloat16, CPU)
    quantized = load_model(preset(WIDE), torch.bfloat16, CPU, quantization=method)
    per_layer = WIDE.hidden_size * (WIDE.q_size + 2 * WIDE.kv_size) + WIDE.q_size * WIDE.hidden_size \
        + 3 * WIDE.hidden_size * WIDE.intermediate_size
    assert plain.linear_weight_bytes() == WIDE.num_layers * per_layer * 2
    # int8 (1 byte) or two int4 per byte, plus one fp32 scale per 128 weights.
    assert quantized.linear_weight_bytes() == pytest.approx(plain.linear_weight_bytes() * ratio, rel=1e-9)
    assert quantized.linear_weight_bytes() / plain.linear_weight_bytes() < (0.52 if method == "wint8" else 0.27)
    # The rest of the model is as big as before.
    rest = sum(p.numel() * p.element_size() for p in quantized.parameters())
    assert rest == sum(p.numel() * p.element_size() for n, p in plain.named_parameters()
                       if not n.endswith(QUANTIZED_LINEARS))


def test_a_preset_is_drawn_and_quantized_one_layer_at_a_time(monkeypatch):
    seen = []
    original = DecoderLayer.quantize_

    def spy(layer, method):
        model_layers = spy.model.layers
        full = [i for i, lay in enumerate(model_layers) if isinstance(lay.down_proj, nn.Parameter)
                and lay.down_proj.device.type != "meta"]
        seen.append((layer.layer_idx, full))
        original(layer, method)

    real_init = Transformer.init_random

    def init_random(self, *args, **kwargs):
        spy.model = self
        assert all(p.device.type == "meta" for p in self.parameters()), "built on the meta device"
        return real_init(self, *args, **kwargs)

    monkeypatch.setattr(DecoderLayer, "quantize_", spy)
    monkeypatch.setattr(Transformer, "init_random", init_random)
    model = load_model(preset(WIDE), torch.float32, CPU, quantization="wint4")
    # When layer i is quantized, it is the only one holding full-precision weights.
    assert seen == [(i, [i]) for i in range(WIDE.num_layers)]
    assert model.device == CPU and not any(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    torch.testing.assert_close(model.inv_freq, Transformer(WIDE).inv_freq)


def test_a_checkpoint_is_loaded_then_quantized(tmp_path: Path):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).save_pretrained(tmp_path / "m")
    source = resolve_model(tmp_path / "m")
    plain = load_model(source, torch.float32, CPU)
    quantized = load_model(source, torch.float32, CPU, quantization="wint8")
    for i, layer in enumerate(quantized.layers):
        for name in QUANTIZED_LINEARS:
            ref = quantize(getattr(plain.layers[i], name).detach(), METHODS["wint8"])
            assert torch.equal(getattr(layer, name).qweight, ref.qweight), (i, name)
    with pytest.raises(ValueError, match="already quantized"):
        quantized.load_weights(source.iter_weights())


def test_a_shape_that_does_not_fit_is_a_config_error_naming_the_layer():
    odd = WIDE.with_(hidden_size=48, num_heads=3, num_kv_heads=1, name="odd")  # K = 48: no group of 32 or more
    with pytest.raises(ConfigError, match=r"'wint4' does not fit odd: layers\.0\.qkv_proj: in_features 48"):
        load_model(preset(odd), torch.float32, CPU, quantization="wint4")
    with pytest.raises(ConfigError, match="unknown quantization 'fp8'"):
        load_model(preset(WIDE), torch.float32, CPU, quantization="fp8")


def test_quantizing_twice_is_refused():
    model = load_model(resolve_model("tiny"), torch.float32, CPU, quantization="wint8")
    with pytest.raises(ValueError, match=r"layers\.0\.qkv_proj is already quantized"):
        model.quantize_(METHODS["wint4"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_peak_is_one_layer_and_the_freed_memory_goes_back_to_the_driver():
    torch.cuda.empty_cache()
    source = resolve_model("llama2-7b")  # 13.5 GB in bf16; K = 4096 and 11008 = 86 * 128
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = load_model(source, torch.bfloat16, torch.device("cuda"), quantization="wint4")
    c = source.config
    held = torch.cuda.memory_allocated() - before
    layer_bytes = 2 * (c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size
                       + 3 * c.hidden_size * c.intermediate_size)
    assert held < 0.3 * c.num_params() * 2
    # One layer in bf16 at a time, plus quantize()'s fp32 temporaries (a few 64 MiB slabs).
    assert torch.cuda.max_memory_allocated() - before < held + layer_bytes + (512 << 20)
    # What the engine's mem_get_info sees as taken is what the model holds: the caching allocator
    # kept no freed full-precision layers back.
    assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() < 0.5 * layer_bytes + (256 << 20)
    del model
    torch.cuda.empty_cache()
