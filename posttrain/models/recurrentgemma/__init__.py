"""RecurrentGemma (Griffin): configuration, presets, the decoder, its decoding state, and the
Hugging Face (`huggingface`) and official Orbax (`official`) checkpoint formats."""

from posttrain.models.recurrentgemma.config import PRESETS, RecurrentGemmaConfig, get_preset
from posttrain.models.recurrentgemma.model import (
    RecurrentGemma,
    RecurrentGemmaOutput,
    RecurrentGemmaState,
    abstract_params,
    decode_step,
    forked_hidden,
    forward,
    hidden_states,
    init_params,
    init_state,
    logits_from_hidden,
    param_count,
    param_logical_axes,
    prefill,
    repeat_rows,
    select_rows,
)

__all__ = [
    "PRESETS",
    "RecurrentGemma",
    "RecurrentGemmaConfig",
    "RecurrentGemmaOutput",
    "RecurrentGemmaState",
    "abstract_params",
    "decode_step",
    "forked_hidden",
    "forward",
    "get_preset",
    "hidden_states",
    "init_params",
    "init_state",
    "logits_from_hidden",
    "param_count",
    "param_logical_axes",
    "prefill",
    "repeat_rows",
    "select_rows",
]
