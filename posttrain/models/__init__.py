"""Gemma 1 / Gemma 2 backbone: configuration, presets, the decoder and its decoding cache."""

from posttrain.models.cache import DecodeCache, init_cache, select_rows
from posttrain.models.config import PRESETS, ModelConfig, get_preset
from posttrain.models.model import Model
from posttrain.models.transformer import (
    Transformer,
    abstract_params,
    decode_step,
    decode_weights,
    forward,
    init_params,
    logits_from_hidden,
    param_logical_axes,
    positions_from_segments,
    prefill,
)

__all__ = [
    "PRESETS",
    "DecodeCache",
    "Model",
    "ModelConfig",
    "Transformer",
    "abstract_params",
    "decode_step",
    "decode_weights",
    "forward",
    "get_preset",
    "init_cache",
    "init_params",
    "logits_from_hidden",
    "param_logical_axes",
    "positions_from_segments",
    "prefill",
    "select_rows",
]
