"""The simulator's model table: ERNIE-4.5-300B-A47B's numbers, and the engine refusing a model it cannot run."""

import pytest

from pdlab.errors import ConfigError, ModelNotFoundError
from pdlab.models.presets import PRESETS
from pdlab.policy.request import Request
from pdlab.policy.scheduler import ScheduledBatch, ScheduledRequest
from pdlab.sampling_params import SamplingParams
from pdlab.sim.models import ERNIE_45_300B_A47B, MOE_MODELS, SIM_MODELS, sim_model

ERNIE = ERNIE_45_300B_A47B


def test_ernie_parameter_counts_match_its_name():
    # "300B-A47B": a wrong expert count, width, top-k, first MoE layer or shared-expert count would miss these.
    assert ERNIE.total_params == pytest.approx(300e9, rel=0.02)
    assert ERNIE.active_params == pytest.approx(47e9, rel=0.03)
    assert ERNIE.config.head_dim == 128 and ERNIE.config.kv_size == 1024  # qkv_proj is 8192 x 10240


def test_dense_presets_count_as_the_models_do():
    for name, config in PRESETS.items():
        model = SIM_MODELS[name]
        assert model.moe is None and model.total_params == model.active_params == config.num_params(), name


def test_fastdeploys_deployment_fits_and_costs_what_the_roofline_says():
    # wint4 at TP4 (FastDeploy's prefill and decode instances): 300B x 0.5 byte / 4 GPUs = 37 GB of weights each.
    cost = ERNIE.cost(tp=4, weight_bits=4)
    assert cost.weight_bytes_stored == pytest.approx(ERNIE.total_params * 0.5 / 4)
    blocks = cost.max_num_blocks(64)
    assert blocks * 64 > 100_000  # room for a real KV cache next to the weights
    assert ERNIE.cost(tp=1).max_num_blocks(64) == 0  # 600 GB of bf16 weights fit no single GPU
    # A batch-1 decode step reads the active experts only; a batch of 128 nearly all of them.
    one, many = ([ScheduledRequest(Request(f"r{i}", [5] * 1025, SamplingParams()), 1024, 1, True)
                  for i in range(b)] for b in (1, 128))
    embedding = ERNIE.config.vocab_size * ERNIE.config.hidden_size
    assert cost.weight_bytes_for(1) == pytest.approx((ERNIE.active_params - embedding) * 0.5 / 4)
    assert cost.step_time_s(ScheduledBatch(many)) > 3 * cost.step_time_s(ScheduledBatch(one))


def test_sim_model_names_the_simulator_only_models_when_nothing_matches():
    assert sim_model("ernie-4.5-300b-a47b") is ERNIE and sim_model("llama3-8b").config is PRESETS["llama3-8b"]
    with pytest.raises(ModelNotFoundError, match="in the simulator only, ernie-4.5-300b-a47b"):
        sim_model("no-such-model")


def test_the_engine_knows_the_simulator_only_models_by_name():
    from pdlab.models.presets import SIMULATOR_ONLY_MODELS

    assert set(SIMULATOR_ONLY_MODELS) == set(MOE_MODELS)


def test_the_engine_refuses_a_mixture_of_experts_model():
    from pdlab.models.source import resolve_model

    for name in MOE_MODELS:
        with pytest.raises(ConfigError, match="mixture-of-experts model that only the simulator runs"):
            resolve_model(name)


def test_llm_engine_refuses_it_before_touching_a_device():
    pytest.importorskip("torch")
    from pdlab.engine.config import EngineConfig
    from pdlab.engine.engine import LLMEngine

    with pytest.raises(ConfigError, match="only the simulator runs"):
        LLMEngine(EngineConfig(model="ernie-4.5-300b-a47b", device="cpu"))
