"""The model shapes the simulator knows: every dense preset, and mixture-of-experts models the engine cannot run.

    model = sim_model("ernie-4.5-300b-a47b")
    cost = model.cost(tp=4, weight_bits=4)  # FastDeploy's wint4, TP4

A `SimModel` is a dense `ModelConfig` (attention, embeddings, and the MLP of
the layers before the first MoE layer) plus an optional `MoeSpec`. The engine
runs dense models only: `pdlab.models.source.resolve_model` refuses the names
in `MOE_MODELS` (`pdlab.models.presets.SIMULATOR_ONLY_MODELS`) with a message that says so.

Standard library only (no torch), like the rest of the simulator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pdlab.errors import ModelNotFoundError
from pdlab.models.config import ModelConfig
from pdlab.models.presets import PRESETS
from pdlab.sim.cost import H100, GpuSpec, MoeSpec, RooflineCost


@dataclass(frozen=True)
class SimModel:
    config: ModelConfig
    moe: MoeSpec | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def total_params(self) -> int:
        return RooflineCost(self.config, moe=self.moe).total_params

    @property
    def active_params(self) -> int:
        return RooflineCost(self.config, moe=self.moe).active_params

    def cost(self, gpu: GpuSpec = H100, tp: int = 1, weight_bits: int = 16, **kwargs) -> RooflineCost:
        """The roofline cost model of one instance of this model (`kwargs`: RooflineCost's efficiencies)."""
        return RooflineCost(self.config, gpu, tp=tp, weight_bits=weight_bits, moe=self.moe, **kwargs)


# ERNIE-4.5-300B-A47B, the model of FastDeploy's disaggregated deployment (wint4, TP4 prefill + TP4 decode).
# Sources:
# - PaddlePaddle/FastDeploy tests/layers/test_attention_layer.py (an earlier version, which writes a reduced copy
#   of the model's config.json: 5 layers, moe_k 4, MoE from layer 1): architectures Ernie4_5_MoeForCausalLM,
#   hidden_size 8192, intermediate_size 28672, num_attention_heads 64, num_key_value_heads 8, vocab_size 103424,
#   rope_theta 500000, rms_norm_eps 1e-5, max_position_embeddings 131072, bos 1 / eos 2, moe_num_experts 64,
#   moe_intermediate_size 3584, tie_word_embeddings false; tests/layers/test_quantized_linear.py: num_hidden_layers
#   54 with hidden 8192 and 64/8 heads.
# - MindIE-LLM's atb_llm ERNIE-MoE router test (the 300B config): all of the above but tie_word_embeddings, and
#   num_hidden_layers 54, moe_k 8, moe_num_shared_experts 0, moe_layer_start_index 3, moe_layer_end_index 53,
#   moe_layer_interval 1.
# - A dump of the 300B checkpoint's tensor shapes (Hchnr/test load/safe_open.output.numpy): embed_tokens
#   (103424, 8192), qkv_proj (8192, 10240) = 64 x 128 + 2 x 8 x 128, experts' up_gate_proj (8192, 7168) = 2 x 3584,
#   down_proj (3584, 8192).
# - Model pages summarising the Hugging Face card (apxml.com, crafiq.ai): 54 layers, 64 query / 8 KV heads,
#   64 experts with 8 active, 131072 context, 300B total / 47B active parameters.
# - Hugging Face transformers' ernie4_5_moe configuration: what the moe_* keys mean (MoE layers from
#   moe_layer_start_index to moe_layer_end_index, every moe_layer_interval).
# So: layers 0-2 dense (MLP 28672 wide), layers 3-53 MoE (51 layers, 64 experts of 3584, top-8, no shared expert).
# Only MindIE states the start index and the shared-expert count; the parameter counts pin both (MoE from layer 1
# would make 309B in total, two shared experts 57B active). tie_word_embeddings comes from FastDeploy's fixture
# alone (MindIE's says true): tied, the counts would be 0.85B lower (0.3% of the total, 1.8% of the active).
# The checkpoint's multi-token-prediction layer (num_nextn_predict_layers 1) is not in serving's forward pass.
# Counted here (tests/sim/test_models.py): 299.5B total, 47.9B active.
ERNIE_45_300B_A47B = SimModel(
    ModelConfig(vocab_size=103424, hidden_size=8192, intermediate_size=28672, num_layers=54, num_heads=64,
                num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, name="ernie-4.5-300b-a47b"),
    MoeSpec(num_experts=64, experts_per_token=8, expert_intermediate_size=3584, num_shared_experts=0,
            num_dense_layers=3),
)

MOE_MODELS: dict[str, SimModel] = {"ernie-4.5-300b-a47b": ERNIE_45_300B_A47B}
SIM_MODELS: dict[str, SimModel] = {**{name: SimModel(config) for name, config in PRESETS.items()}, **MOE_MODELS}


def sim_model(name: str, resolve_config: Callable[[str], ModelConfig] | None = None) -> SimModel:
    """A name in `SIM_MODELS`, else the dense model whose config `resolve_config(name)` reads (a Hugging Face
    directory or a GGUF file: pass `lambda name: pdlab.models.source.resolve_model(name).config`, which the
    simulator does not import, since reading weights' files needs torch). Raises `ModelNotFoundError`, naming
    the simulator-only models, when nothing matches."""
    if name in SIM_MODELS:
        return SIM_MODELS[name]
    only_here = f"in the simulator only, {', '.join(MOE_MODELS)}"
    if resolve_config is None:
        raise ModelNotFoundError(f"the simulator knows no model called {name!r}: a preset ({', '.join(PRESETS)}); "
                                 f"or, {only_here}")
    try:
        return SimModel(resolve_config(name))
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"{e}; or, {only_here}") from None
