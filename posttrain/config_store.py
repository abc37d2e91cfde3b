"""Hydra config groups built from Python: the model presets, and nodes turned back into dataclasses.

`posttrain.models.backbone.PRESETS` (every family's presets: Gemma's and RecurrentGemma's) is the
one source of the `model` group: `register_configs()` stores every preset as `model/<name>`, so
`model=gemma2_2b`, `model=tiny_recurrentgemma` and `model.num_layers=2` work with no YAML copy to
drift. A node's `family` field names its config class. Call it before Hydra composes (the
`posttrain` command does so at import).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from posttrain.models.backbone import PRESETS, BackboneConfig, backbone_for_family
from posttrain.train.optim import OptimConfig

_Config = TypeVar("_Config")


def preset_node(config: BackboneConfig) -> dict[str, Any]:
    """A preset as a plain dict of its config's fields, tuples as lists (YAML has no tuples)."""
    node = dataclasses.asdict(config)
    return {key: list(value) if isinstance(value, tuple) else value for key, value in node.items()}


def register_configs() -> None:
    """Store every model preset in Hydra's ConfigStore as `model/<preset>` (idempotent)."""
    store = ConfigStore.instance()
    for name, config in PRESETS.items():
        # store() replaces an entry of the same name, so calling this twice changes nothing.
        store.store(group="model", name=name, node=preset_node(config), provider="posttrain")


def dataclass_from_node(
    cls: type[_Config],
    node: DictConfig | Mapping[str, Any],
    group: str,
    lists_as_tuples: bool = True,
    ignore: tuple[str, ...] = (),
) -> _Config:
    """An instance of dataclass `cls` from a composed config node; an unknown key fails naming
    `group.key` and the closest field. Lists become tuples unless told otherwise (the frozen
    model and optimizer configs hold tuples); keys in `ignore` are dropped."""
    fields = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    fields = {key: value for key, value in dict(fields).items() if key not in ignore}
    known = [field.name for field in dataclasses.fields(cls)]
    for key in fields:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {group}.{close[0]}?" if close else f"; known: {known}"
            raise ValueError(f"unknown {cls.__name__} field {group}.{key}{hint}")
    if lists_as_tuples:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return cls(**fields)


def model_config_from_node(node: DictConfig | Mapping[str, Any]) -> BackboneConfig:
    """The config of a composed `cfg.model` node, of the class its `family` names (tuples
    restored, unknown fields named)."""
    family = node.get("family")
    if family is None:
        raise ValueError("model.family is missing: it names the model's family (gemma2, ...)")
    return dataclass_from_node(backbone_for_family(family).config_class, node, "model")


def optim_config_from_node(node: DictConfig | Mapping[str, Any]) -> OptimConfig:
    """The OptimConfig of a composed `cfg.optim` node, interpolations (total_steps) resolved."""
    return dataclass_from_node(OptimConfig, node, "optim")
