"""The backbones: Gemma 1 / Gemma 2 and RecurrentGemma behind one interface (`backbone`, its
contract in `interface`).

Code above `models/` (sampling, losses, rewards, stages) goes through `posttrain.models.backbone`
only. The parameter functions here (`init_params`, `abstract_params`, `param_logical_axes`,
`forward`, `logits_from_hidden`) are the interface's, so they take a config of either family.
The rest (`Transformer`, `prefill`, `decode_step`, `init_cache`, `select_rows`, `PRESETS`,
`get_preset` ...) are the Gemma transformer's own; `backbone.PRESETS` / `backbone.get_preset`
hold every family's presets.
"""

from posttrain.models import backbone
from posttrain.models.backbone import (
    BackboneConfig,
    abstract_params,
    backbone_of,
    forward,
    init_params,
    logits_from_hidden,
    param_logical_axes,
)
from posttrain.models.cache import DecodeCache, init_cache, select_rows
from posttrain.models.config import PRESETS, ModelConfig, get_preset
from posttrain.models.model import Model
from posttrain.models.recurrentgemma import RecurrentGemmaConfig
from posttrain.models.transformer import (
    Transformer,
    decode_step,
    decode_weights,
    positions_from_segments,
    prefill,
)

__all__ = [
    "PRESETS",
    "BackboneConfig",
    "DecodeCache",
    "Model",
    "ModelConfig",
    "RecurrentGemmaConfig",
    "Transformer",
    "abstract_params",
    "backbone",
    "backbone_of",
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
