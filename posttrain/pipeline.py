"""Pipelines: run a recipe's stages in order inside one pipeline directory.

Each stage runs in `<pipeline_dir>/<stage name>/` and leaves `metrics.json` there when it
finishes, so running the recipe again skips finished stages and resumes an interrupted one
from its checkpoints. `inputs` feed an earlier stage's outputs into a later stage's config:
`{stage.init_checkpoint: sft.checkpoint}` sets that key to the `checkpoint` the `sft` stage
reported. All stages of a pipeline share one wandb group.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

RECIPE_KEYS = {"name", "description", "stages"}
STAGE_KEYS = {"name", "type", "overrides", "inputs"}


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read and check a recipe YAML, naming any unknown key."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"recipe {path} not found")
    recipe = yaml.safe_load(path.read_text())
    unknown = set(recipe) - RECIPE_KEYS
    if unknown:
        raise ValueError(
            f"{path}: unknown recipe keys {sorted(unknown)}; allowed {sorted(RECIPE_KEYS)}"
        )
    names = []
    for index, stage in enumerate(recipe.get("stages") or []):
        unknown = set(stage) - STAGE_KEYS
        if unknown:
            raise ValueError(f"{path}: stage {index} has unknown keys {sorted(unknown)}")
        if "name" not in stage or "type" not in stage:
            raise ValueError(f"{path}: stage {index} needs a name and a type")
        for key, source in (stage.get("inputs") or {}).items():
            producer = str(source).split(".")[0]
            if producer not in names:
                raise ValueError(
                    f"{path}: stage {stage['name']!r} input {key}: {source} names no earlier stage"
                )
        names.append(stage["name"])
    if not names:
        raise ValueError(f"{path}: a recipe needs at least one stage")
    return recipe


def run_pipeline(
    recipe_path: str | Path,
    pipeline_dir: str | Path,
    extra_overrides: list[str],
    compose: Callable[[list[str]], DictConfig],
    run_stage: Callable[[DictConfig], dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Run every stage not yet finished; returns each stage's metrics."""
    recipe = load_recipe(recipe_path)
    pipeline_dir = Path(pipeline_dir)
    outputs: dict[str, dict[str, Any]] = {}
    for stage in recipe["stages"]:
        stage_dir = pipeline_dir / stage["name"]
        done = stage_dir / "metrics.json"
        if done.exists():
            print(f"[pipeline] {stage['name']}: finished earlier, skipped")
            outputs[stage["name"]] = json.loads(done.read_text())
            continue
        overrides = [f"stage={stage['type']}", *stage.get("overrides", [])]
        for key, source in (stage.get("inputs") or {}).items():
            producer, field = str(source).split(".", 1)
            if field not in outputs[producer]:
                raise KeyError(
                    f"stage {producer!r} reported no {field!r} (has {sorted(outputs[producer])})"
                )
            overrides.append(f"{key}={outputs[producer][field]}")
        overrides += [
            f"run_dir={stage_dir}",
            f"logger.group={recipe['name']}",
            f"logger.name={stage['name']}",
        ]
        overrides += extra_overrides
        print(f"[pipeline] {stage['name']} ({stage['type']}) in {stage_dir}")
        outputs[stage["name"]] = run_stage(compose(overrides))
        if outputs[stage["name"]].get("interrupted"):
            print(f"[pipeline] {stage['name']}: interrupted; run the recipe again to resume")
            break
    return outputs
