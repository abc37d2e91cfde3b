"""Pipelines: run a recipe's stages in order inside one pipeline directory.

Each stage runs in `<pipeline_dir>/<stage name>/` and leaves `metrics.json` there when it
finishes, so running the recipe again skips finished stages (saying why, and naming any setting
that changed since) and resumes an interrupted one from its checkpoints. `redo=[sft]` (or
`redo=all`) runs finished stages again, and every stage fed by a redone one; the earlier run is
kept as `<stage>.previous-<n>/`. `inputs` feed an earlier stage's outputs into a later stage's
config: `{stage.init_checkpoint: sft.checkpoint}` sets that key to the `checkpoint` the `sft`
stage reported. Command-line `stage.*` overrides go to every stage whose schema has the key;
other overrides go to every stage. All stages of a pipeline share one wandb group, and the
pipeline ends by printing one table of its stages' results.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

RECIPE_KEYS = {"name", "description", "stages"}
STAGE_KEYS = {"name", "type", "overrides", "inputs"}
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read and check a recipe YAML, naming any unknown key."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"recipe {path} not found")
    recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
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
        if stage["name"] in names:
            raise ValueError(f"{path}: two stages are named {stage['name']!r}")
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


@functools.cache
def stage_keys(stage_type: str) -> frozenset[str]:
    """Every `stage.<key>` (dotted, nested keys included) of a stage type's config."""
    path = CONF_DIR / "stage" / f"{stage_type}.yaml"
    if not path.exists():
        return frozenset()
    from posttrain.resume import flatten

    return frozenset(f"stage.{k}" for k in flatten(yaml.safe_load(path.read_text())))


def _previous_dir(stage_dir: Path) -> Path:
    index = 1
    while (stage_dir.parent / f"{stage_dir.name}.previous-{index}").exists():
        index += 1
    return stage_dir.parent / f"{stage_dir.name}.previous-{index}"


def results_table(rows: list[tuple[str, str, str, dict[str, Any]]]) -> str:
    """Markdown: one row per stage (name, type, what happened, its headline metrics)."""
    from posttrain.stages.registry import stage_specs

    specs = stage_specs()
    lines = ["| stage | type | status | results |", "|---|---|---|---|"]
    for name, stage_type, status, metrics in rows:
        headline = specs[stage_type].headline if stage_type in specs else ()
        shown = [k for k in headline if k in metrics] or [
            k for k, v in metrics.items() if isinstance(v, float)
        ][:3]
        cells = ", ".join(
            f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}"
            for k in shown
        )
        lines.append(f"| {name} | {stage_type} | {status} | {cells} |")
    return "\n".join(lines)


def run_pipeline(
    recipe_path: str | Path,
    pipeline_dir: str | Path,
    extra_overrides: list[str],
    compose: Callable[[list[str]], DictConfig],
    run_stage: Callable[..., dict[str, Any]],
    stage_overrides: Sequence[str] = (),
    redo: Sequence[str] = (),
    command: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every stage not yet finished (or asked to be redone); returns each stage's metrics."""
    from posttrain.resume import config_changes, load_saved_config, override_key

    recipe = load_recipe(recipe_path)
    names = [stage["name"] for stage in recipe["stages"]]
    unknown = sorted(set(redo) - {"all", *names})
    if unknown:
        raise ValueError(f"redo={unknown}: no such stage in {recipe_path}; stages: {names}")
    pipeline_dir = Path(pipeline_dir)
    command = command or f"posttrain recipe={recipe_path} pipeline_dir={pipeline_dir}"
    outputs: dict[str, dict[str, Any]] = {}
    ran: set[str] = set()  # stages run by this invocation: their dependents must run too
    report: list[tuple[str, str, str, dict[str, Any]]] = []
    for stage in recipe["stages"]:
        name, stage_type = stage["name"], stage["type"]
        stage_dir = pipeline_dir / name
        overrides = [f"stage={stage_type}", *stage.get("overrides", [])]
        overrides += [o for o in stage_overrides if override_key(o) in stage_keys(stage_type)]
        producers = set()
        for key, source in (stage.get("inputs") or {}).items():
            producer, field = str(source).split(".", 1)
            producers.add(producer)
            if field not in outputs[producer]:
                raise KeyError(
                    f"stage {producer!r} reported no {field!r} (has {sorted(outputs[producer])})"
                )
            overrides.append(f"{key}={outputs[producer][field]}")
        overrides += [
            f"run_dir={stage_dir}",
            f"logger.group={recipe['name']}",
            f"logger.name={name}",
        ]
        overrides += extra_overrides
        cfg = compose(overrides)
        done = stage_dir / "metrics.json"
        fed_by_redo = sorted(producers & ran)
        if done.exists():
            wanted = "all" in redo or name in redo or fed_by_redo
            if not wanted:
                saved = load_saved_config(stage_dir)
                changes = (
                    config_changes(saved, OmegaConf.to_container(cfg, resolve=True))
                    if saved is not None
                    else {}
                )
                if changes:
                    listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
                    print(
                        f"[pipeline] {name}: finished earlier, skipped although its settings "
                        f"changed since ({listed}); redo={name} runs it again"
                    )
                else:
                    print(f"[pipeline] {name}: finished earlier with the same settings, skipped")
                outputs[name] = json.loads(done.read_text(encoding="utf-8"))
                report.append((name, stage_type, "skipped (finished)", outputs[name]))
                continue
            reason = f"its inputs from {fed_by_redo} were re-made" if fed_by_redo else "redo"
            previous = _previous_dir(stage_dir)
            stage_dir.rename(previous)
            print(f"[pipeline] {name}: running again ({reason}); the earlier run is in {previous}")
        print(f"[pipeline] {name} ({stage_type}) in {stage_dir}", flush=True)
        outputs[name] = run_stage(cfg, overrides, command)
        ran.add(name)
        if outputs[name].get("interrupted"):
            report.append((name, stage_type, "interrupted", outputs[name]))
            print(f"[pipeline] {name}: interrupted; resume the pipeline with:\n    {command}")
            break
        report.append((name, stage_type, "ran", outputs[name]))
    table = results_table(report)
    print(f"\n[pipeline] {recipe['name']} in {pipeline_dir}\n{table}", flush=True)
    if pipeline_dir.exists():
        (pipeline_dir / "results.md").write_text(table + "\n", encoding="utf-8")
    return outputs
