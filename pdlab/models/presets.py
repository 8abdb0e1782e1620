"""Named model shapes for random-weight runs: tiny ones for tests, real ones for speed and memory studies.

The real shapes are copied from each model's published `config.json` (the
Instruct release where there is one, hence its BOS/EOS ids). Presets carry no
weights and no tokenizer: the engine fills them with seeded random weights
and pairs them with a `ByteTokenizer`.
"""

from __future__ import annotations

from pdlab.models.config import ModelConfig, RopeScaling

LLAMA31_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
             max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)

PRESETS: dict[str, ModelConfig] = {
    # --- tiny shapes for tests: each one exercises a different branch of the model
    "tiny": ModelConfig(**_TINY, name="tiny"),
    "tiny-llama3": ModelConfig(**_TINY, rope_theta=500000.0, name="tiny-llama3",
                               rope_scaling=RopeScaling(original_max_position_embeddings=256)),
    "tiny-qwen2": ModelConfig(**_TINY, attention_bias=True, tie_word_embeddings=True, rms_norm_eps=1e-6,
                              name="tiny-qwen2"),
    "tiny-qwen3": ModelConfig(**_TINY, qk_norm=True, head_dim=32, tie_word_embeddings=True, rms_norm_eps=1e-6,
                              name="tiny-qwen3"),
    # --- real shapes
    # HuggingFaceTB/SmolLM2-135M-Instruct
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
        rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, name="smollm2-135m"),
    # meta-llama/Llama-2-7b-chat-hf
    "llama2-7b": ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32, num_kv_heads=32,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, name="llama2-7b"),
    # meta-llama/Llama-3.1-8B-Instruct (eos also 128008, 128009)
    "llama3-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE, max_position_embeddings=131072,
        bos_token_id=128000, eos_token_id=128001, name="llama3-8b"),
    # meta-llama/Llama-3.1-70B-Instruct
    "llama3-70b": ModelConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE, max_position_embeddings=131072,
        bos_token_id=128000, eos_token_id=128001, name="llama3-70b"),
    # Qwen/Qwen3-8B
    "qwen3-8b": ModelConfig(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_layers=36, num_heads=32, num_kv_heads=8,
        head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960, qk_norm=True,
        bos_token_id=151643, eos_token_id=151645, name="qwen3-8b"),
    # Qwen/Qwen2.5-7B-Instruct
    "qwen2.5-7b": ModelConfig(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
        rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768, attention_bias=True,
        bos_token_id=151643, eos_token_id=151645, name="qwen2.5-7b"),
    # mistralai/Mistral-7B-Instruct-v0.3 (no sliding window)
    "mistral-7b": ModelConfig(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
        rms_norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=32768,
        bos_token_id=1, eos_token_id=2, name="mistral-7b"),
}

# Models the simulator knows but the engine cannot run (mixtures of experts). Their shapes are defined with the
# simulator (pdlab/sim/models.py: MOE_MODELS; a test checks both name the same models); the engine only needs
# their names, to refuse them with a message that says where they run.
SIMULATOR_ONLY_MODELS = ("ernie-4.5-300b-a47b",)
