"""Checkpoint formats: Hugging Face safetensors directories and the official Flax/Orbax tree."""

from pathlib import Path

from posttrain.checkpoints.huggingface import CheckpointError, load_hf, save_hf
from posttrain.checkpoints.official import load_official, save_official
from posttrain.models.backbone import BackboneConfig
from posttrain.models.interface import Params
from posttrain.models.model import Model


def load_hf_model(directory: str | Path, dtype: str | None = None) -> Model:
    """Load a Hugging Face Gemma / Gemma 2 / RecurrentGemma directory as a callable `Model`."""
    config, params = load_hf(directory, dtype)
    return Model(config, params)


def load_policy(path: str | Path, config: BackboneConfig) -> tuple[BackboneConfig, Params]:
    """(config, params) of a Hugging Face directory (its config.json rules), or of an official
    Orbax checkpoint of Gemma or RecurrentGemma (which has no config: `config`, the `model=`
    preset, gives its family and shape, and is checked against the tree)."""
    if (Path(path) / "config.json").exists():
        return load_hf(path)
    if not Path(path).is_dir():
        raise CheckpointError(
            f"{path}: neither a Hugging Face directory (config.json) nor an Orbax checkpoint"
        )
    return load_official(path, config)


__all__ = [
    "CheckpointError",
    "Model",
    "load_hf",
    "load_hf_model",
    "load_official",
    "load_policy",
    "save_hf",
    "save_official",
]
