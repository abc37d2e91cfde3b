"""Pipelines: run a recipe's stages in order inside one pipeline directory.

Each stage runs in `<pipeline_dir>/<stage name>/` and leaves `metrics.json` there when it
finishes, so running the recipe again skips finished stages (saying why, and naming any setting
that changed since) and resumes an interrupted one from its checkpoints. `redo=[sft]` (or
`redo=all`) runs finished stages again, and every stage fed by a redone one; the earlier run is
kept as `<stage>.previous-<n>/`. `inputs` feed an earlier stage's outputs into a later stage's
config: `{stage.init_checkpoint: sft.checkpoint}` sets that key to the `checkpoint` the `sft`
stage reported. A recipe's `params` are the values its user supplies (a checkpoint path, a
dataset name; `???` when there is no default): stages read them as inputs `params.<name>`, and
the command line sets them with `params.<name>=VALUE`. Command-line `stage.*` overrides go to
every stage whose schema has the key; other overrides go to every stage. All stages of a
pipeline share one wandb group, and the pipeline ends by printing one table of its stages'
results.

With `dry_run=true` every stage builds its model from abstract shapes and reports its memory
per device, nothing is trained or written but `dry_run.json`, and the outputs later stages
would read (checkpoints, data files) are placeholders naming what would be there.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

RECIPE_KEYS = {"name", "description", "params", "overrides", "stages"}
PARAMS = "params"  # the pseudo-stage whose outputs are the recipe's parameters
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
    params = recipe.get(PARAMS) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{path}: params must be a mapping of name -> default (??? if required)")
    names = [PARAMS] if params else []
    for index, stage in enumerate(recipe.get("stages") or []):
        unknown = set(stage) - STAGE_KEYS
        if unknown:
            raise ValueError(f"{path}: stage {index} has unknown keys {sorted(unknown)}")
        if "name" not in stage or "type" not in stage:
            raise ValueError(f"{path}: stage {index} needs a name and a type")
        if stage["name"] in names:
            what = (
                "a stage is named like the recipe's params"
                if stage["name"] == PARAMS
                else ("two stages are named")
            )
            raise ValueError(f"{path}: {what} {stage['name']!r}")
        for key, source in (stage.get("inputs") or {}).items():
            producer = str(source).split(".")[0]
            if producer not in names:
                raise ValueError(
                    f"{path}: stage {stage['name']!r} input {key}: {source} names no earlier stage"
                )
            if producer == PARAMS and str(source).split(".", 1)[1] not in params:
                raise ValueError(
                    f"{path}: stage {stage['name']!r} input {key}: no recipe param "
                    f"{source!r}; params: {sorted(params)}"
                )
        names.append(stage["name"])
    if names in ([], [PARAMS]):
        raise ValueError(f"{path}: a recipe needs at least one stage")
    return recipe


def override_value(value: Any) -> str:
    """A value as Hydra reads it back: null, true/false, [a,b], or the string itself."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    return str(value)


def recipe_params(recipe: dict[str, Any], given: Sequence[str], dry_run: bool) -> dict[str, Any]:
    """The recipe's params: defaults, then `params.<name>=VALUE` arguments; a required one left
    unset fails naming it (a dry run puts a placeholder instead)."""
    values = dict(recipe.get(PARAMS) or {})
    for argument in given:
        key, _, value = argument.partition("=")
        name = key.removeprefix(f"{PARAMS}.")
        if name not in values:
            import difflib

            close = difflib.get_close_matches(name, list(values), n=1)
            hint = f"; did you mean {PARAMS}.{close[0]}?" if close else ""
            raise ValueError(
                f"{key}: recipe {recipe['name']!r} has no such param "
                f"(params: {sorted(values)}){hint}"
            )
        values[name] = yaml.safe_load(value) if value else value
    missing = sorted(name for name, value in values.items() if value == "???")
    if missing and not dry_run:
        settings = " ".join(f"{PARAMS}.{name}=..." for name in missing)
        raise ValueError(f"recipe {recipe['name']!r} needs {missing}: pass {settings}")
    return {k: (f"DRY_RUN/{PARAMS}.{k}" if v == "???" else v) for k, v in values.items()}


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
        if "memory_bytes_per_device" in metrics:  # a dry run's report
            gib = metrics["memory_bytes_per_device"] / 2**30
            lines.append(
                f"| {name} | {stage_type} | {status} | {metrics['parameters'] / 1e9:.2f}B "
                f"parameters, {gib:.1f} GiB per device on {metrics['devices']} devices |"
            )
            continue
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
    params: Sequence[str] = (),
    dry_run: bool = False,
) -> dict[str, dict[str, Any]]:
    """Run every stage not yet finished (or asked to be redone); returns each stage's metrics.
    `params` are `params.<name>=VALUE` arguments; `dry_run` builds and sizes every stage."""
    from posttrain.resume import config_changes, load_saved_config, override_key

    recipe = load_recipe(recipe_path)
    names = [stage["name"] for stage in recipe["stages"]]
    unknown = sorted(set(redo) - {"all", *names})
    if unknown:
        raise ValueError(f"redo={unknown}: no such stage in {recipe_path}; stages: {names}")
    pipeline_dir = Path(pipeline_dir)
    command = command or f"posttrain recipe={recipe_path} pipeline_dir={pipeline_dir}"
    outputs: dict[str, dict[str, Any]] = {PARAMS: recipe_params(recipe, params, dry_run)}
    ran: set[str] = set()  # stages run by this invocation: their dependents must run too
    report: list[tuple[str, str, str, dict[str, Any]]] = []
    for stage in recipe["stages"]:
        name, stage_type = stage["name"], stage["type"]
        stage_dir = pipeline_dir / name
        # The recipe's own overrides (model, mesh: what every stage shares), then the stage's.
        overrides = [
            f"stage={stage_type}",
            *recipe.get("overrides", []),
            *stage.get("overrides", []),
        ]
        overrides += [o for o in stage_overrides if override_key(o) in stage_keys(stage_type)]
        producers = set()
        for key, source in (stage.get("inputs") or {}).items():
            producer, field = str(source).split(".", 1)
            producers.add(producer)
            if dry_run and field not in outputs[producer]:
                # A dry run makes no files: later stages size their models without them.
                outputs[producer][field] = f"DRY_RUN/{source}"
            if field not in outputs[producer]:
                raise KeyError(
                    f"stage {producer!r} reported no {field!r} (has {sorted(outputs[producer])})"
                )
            overrides.append(f"{key}={override_value(outputs[producer][field])}")
        overrides += [
            f"run_dir={stage_dir}",
            f"logger.group={recipe['name']}",
            f"logger.name={name}",
        ]
        overrides += extra_overrides
        cfg = compose(overrides)
        done = stage_dir / "metrics.json"
        fed_by_redo = sorted(producers & ran)
        if done.exists() and not dry_run:
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
        report.append((name, stage_type, "dry run" if dry_run else "ran", outputs[name]))
    table = results_table(report)
    print(f"\n[pipeline] {recipe['name']} in {pipeline_dir}\n{table}", flush=True)
    if pipeline_dir.exists():
        (pipeline_dir / "results.md").write_text(table + "\n", encoding="utf-8")
    return outputs
