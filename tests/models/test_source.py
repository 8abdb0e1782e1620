"""`resolve_model` turns a preset name, a directory, a GGUF file or an alias into a source, or says why not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pdlab.errors import ModelNotFoundError
from pdlab.models.presets import PRESETS
from pdlab.models.source import resolve_model
from pdlab.models.tokenizer import ByteTokenizer


def test_preset() -> None:
    source = resolve_model("tiny-qwen3")
    assert (source.kind, source.location, source.path) == ("preset", "tiny-qwen3", None)
    assert source.config == PRESETS["tiny-qwen3"]
    assert list(source.iter_weights()) == []
    assert isinstance(source.load_tokenizer(), ByteTokenizer)


def test_resolving_a_preset_does_not_import_torch() -> None:
    code = "import sys; from pdlab.models.source import resolve_model; resolve_model('llama3-8b'); " \
        "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2])
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("alias", ["default", "smollm2", "SmolLM2-135M-Instruct"])
def test_default_aliases_resolve_to_the_installed_gguf(alias: str, smollm2_gguf: Path) -> None:
    source = resolve_model(alias)
    assert (source.kind, source.path) == ("gguf", smollm2_gguf.resolve())
    assert source.config.hidden_size == 576


def test_gguf_path(smollm2_gguf: Path) -> None:
    source = resolve_model(str(smollm2_gguf))
    assert source.kind == "gguf" and source.config.name == "SmolLM2-135M-Instruct.Q4_1"
    name, tensor = next(source.iter_weights())
    assert name == "model.embed_tokens.weight" and tuple(tensor.shape) == (49152, 576)


def test_preset_name_wins_over_a_directory_of_that_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("tiny").kind == "preset"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("ERNIE-4.5-300B-A47B-BF16", "no preset, directory or file is called 'ERNIE-4.5-300B-A47B-BF16'"),
        ("meta-llama/Llama-3.1-8B-Instruct", "Hub id; pdlab never downloads"),
        ("./missing/model.gguf", "no preset, directory or file"),
    ],
)
def test_unknown_names_list_what_is_accepted(name: str, message: str) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(name)
    text = str(info.value)
    assert message in text and "llama3-8b" in text and "config.json" in text and ".gguf" in text


def test_directory_and_file_that_are_not_models(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        resolve_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="neither a model directory nor a .gguf file"):
        resolve_model(tmp_path / "weights.bin")


def test_resolving_a_directory_reads_no_weights(tmp_path: Path) -> None:
    config = {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
              "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
              "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 40960,
              "tie_word_embeddings": False, "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645}
    (tmp_path / "Qwen3-8B").mkdir()
    (tmp_path / "Qwen3-8B" / "config.json").write_text(json.dumps(config))
    (tmp_path / "Qwen3-8B" / "model.safetensors").write_bytes(b"garbage that would fail to parse")

    source = resolve_model(tmp_path / "Qwen3-8B")

    assert source.config == PRESETS["qwen3-8b"].with_(name="Qwen3-8B")
