"""The stage registry: each stage module registers itself; the command and recipes look here.

    @register_stage("sft", groups=("stage", "data", "model", "optim", "logger"), trains=True)
    def run(ctx: StageContext) -> dict: ...

Stage modules are found by listing this package, so a new stage is one new module.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

_NOT_STAGES = {"registry", "kit"}


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """A registered stage."""

    name: str
    run: Callable[[Any], dict[str, Any]]  # (StageContext) -> metrics
    groups: tuple[str, ...]  # config groups whose required (???) values it reads
    trains: bool  # its time is in train steps (host allocator, memory check)
    headline: tuple[str, ...]  # metrics printed first in its summary and in sweep tables


_STAGES: dict[str, StageSpec] = {}


def register_stage(
    name: str,
    *,
    groups: tuple[str, ...] = ("stage",),
    trains: bool = False,
    headline: tuple[str, ...] = (),
) -> Callable[[Callable], Callable]:
    """Decorator registering a stage's `run(ctx)` under `name` (the `stage=` choice)."""

    def register(run: Callable) -> Callable:
        if name in _STAGES and _STAGES[name].run is not run:
            raise ValueError(f"stage {name!r} is registered twice")
        _STAGES[name] = StageSpec(name, run, tuple(groups), trains, tuple(headline))
        return run

    return register


def stage_specs() -> dict[str, StageSpec]:
    """Every stage of `posttrain.stages`, by name (imports the stage modules once)."""
    import posttrain.stages as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in _NOT_STAGES and not module.name.startswith("_"):
            importlib.import_module(f"posttrain.stages.{module.name}")
    return dict(_STAGES)


def get_stage(name: str) -> StageSpec:
    """The stage registered as `name`, or an error listing the known ones."""
    specs = stage_specs()
    if name not in specs:
        raise KeyError(f"unknown stage {name!r}; known: {sorted(specs)}")
    return specs[name]
