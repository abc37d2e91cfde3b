"""Checkpoint formats: Hugging Face safetensors directories and the official Flax/Orbax tree."""

from pathlib import Path

from posttrain.checkpoints.huggingface import CheckpointError, load_hf, save_hf
from posttrain.checkpoints.official import load_official, save_official
from posttrain.models.model import Model


def load_hf_model(directory: str | Path, dtype: str | None = None) -> Model:
    """Load a Hugging Face Gemma / Gemma 2 directory as a callable `Model`."""
    config, params = load_hf(directory, dtype)
    return Model(config, params)


__all__ = [
    "CheckpointError",
    "Model",
    "load_hf",
    "load_hf_model",
    "load_official",
    "save_hf",
    "save_official",
]
