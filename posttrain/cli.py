"""The `posttrain` command: a Hydra app that runs one stage per job, or a recipe of stages.

    posttrain stage=sft data.train=train.jsonl stage.tokenizer=tok.model run_dir=runs/sft
    posttrain -m stage=sft ... optim.lr=1e-3,3e-3      # a sweep: one directory per value
    posttrain resume=runs/sft                           # continue an interrupted run
    posttrain recipe=recipes/tiny_sft.yaml              # a pipeline

Before Hydra composes, the command line is checked and completed (`prepare_arguments`): every
key must exist in the composed schema (`stage.typo=1` and `+stage.typo=1` both fail with a
did-you-mean), `resume=DIR` replays the saved command in DIR, an explicit `run_dir` is also
Hydra's output directory (so a run's files are in one place), a sweep names its job directories
by the swept values, and a recipe's `stage.*` overrides go to the stages that have those keys.
"""

from __future__ import annotations

import difflib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from posttrain.config_store import register_configs

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# The model group comes from Python presets: registered before anything composes `conf/`.
register_configs()
CONFIG_GROUPS = ("model", "mesh", "optim", "data", "logger", "stage")
log = logging.getLogger("posttrain")

# A recipe's `stage.*` overrides, taken off the command line before Hydra composes (the
# default stage's schema would reject keys of the recipe's stages).
_RECIPE_STAGE_OVERRIDES: list[str] = []
_RECIPE_PARAMS: list[str] = []  # `params.<name>=VALUE` arguments of a recipe run


class OverrideError(ValueError):
    """A command-line key that the composed config does not have."""


def _key_value(argument: str) -> tuple[str, str] | None:
    if argument.startswith("-") or "=" not in argument:
        return None
    key, value = argument.split("=", 1)
    return key, value


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _has_key(cfg: DictConfig, key: str) -> tuple[bool, list[str], str]:
    """(exists, sibling keys, parent path) of a dotted key in a composed config."""
    node: Any = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        # `in` is False for a required (???) value: look at the keys instead.
        if not isinstance(node, DictConfig) or part not in list(node.keys()):
            siblings = list(node.keys()) if isinstance(node, DictConfig) else []
            return False, siblings, ".".join(parts[:depth])
        node = node._get_node(part) if depth < len(parts) - 1 else None
    return True, [], ""


def check_keys(arguments: Sequence[str], cfg: DictConfig, where: str) -> None:
    """Fail on any `key=value` (or `+key=value`) whose key `cfg` lacks, with a did-you-mean."""
    for argument in arguments:
        pair = _key_value(argument)
        if pair is None or pair[0].lstrip("+~").startswith("hydra"):
            continue
        key = pair[0].lstrip("+~")
        if "." not in key and key in CONFIG_GROUPS:
            continue
        exists, siblings, parent = _has_key(cfg, key)
        if exists:
            continue
        leaf = key.split(".")[len(parent.split(".")) if parent else 0]
        close = difflib.get_close_matches(leaf, [str(s) for s in siblings], n=1)
        base = f"{parent}." if parent else ""
        hint = f"; did you mean {base}{close[0]}?" if close else ""
        added = " (`+` cannot add keys: every config group has a fixed schema)"
        raise OverrideError(
            f"{key} is not a key of {where}{hint}{added if argument.startswith('+') else ''}"
        )


def _group_choices(arguments: Sequence[str]) -> list[str]:
    choices = []
    for argument in arguments:
        pair = _key_value(argument)
        if pair and pair[0] in CONFIG_GROUPS:
            # A swept group (`stage=sft,reward`) is checked against its first value.
            choices.append(f"{pair[0]}={pair[1].split(',')[0]}")
    return choices


def prepare_arguments(arguments: list[str]) -> list[str]:
    """The command line Hydra gets: checked keys, `resume=` replayed, run_dir pinned, sweep
    directories named, a recipe's stage overrides set aside."""
    from posttrain.resume import override_key, resume_arguments

    pairs = {p[0]: p[1] for p in map(_key_value, arguments) if p}
    if "resume" in pairs:
        run_dir = pairs["resume"]
        rest = [a for a in arguments if not a.startswith("resume=")]
        arguments = resume_arguments(run_dir, rest)
        pairs = {p[0]: p[1] for p in map(_key_value, arguments) if p}
    multirun = "-m" in arguments or "--multirun" in arguments
    if pairs.get("recipe"):
        from posttrain.pipeline import load_recipe, recipe_params, stage_keys

        stage_overrides = [a for a in arguments if override_key(a).startswith("stage.")]
        params = [a for a in arguments if override_key(a).startswith("params.")]
        arguments = [a for a in arguments if a not in stage_overrides and a not in params]
        _RECIPE_PARAMS[:] = params
        recipe = load_recipe(pairs["recipe"])
        types = sorted({stage["type"] for stage in recipe["stages"]})
        for override in stage_overrides:
            key = override_key(override)
            if not any(key in stage_keys(t) for t in types):
                known = sorted(set().union(*(stage_keys(t) for t in types)))
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]}?" if close else ""
                raise OverrideError(
                    f"{key} is not a key of any stage of {pairs['recipe']} ({types}){hint}"
                )
        _RECIPE_STAGE_OVERRIDES[:] = stage_overrides
        # Required params are checked before Hydra starts: a clean error, no traceback.
        dry_run = str(pairs.get("dry_run", "false")).lower() == "true"
        recipe_params(recipe, params, dry_run)
    plain = [a for a in arguments if not a.startswith("-")]
    cfg = _compose(_group_choices(plain))
    stage = cfg.stage.name
    check_keys(plain, cfg, f"the config with stage={stage}")
    if "run_dir" in pairs and "hydra.run.dir" not in pairs and not multirun:
        arguments = [*arguments, f"hydra.run.dir={pairs['run_dir']}"]
    if multirun:
        from posttrain.sweep import sweep_subdir_overrides

        arguments = [*arguments, *sweep_subdir_overrides(arguments)]
    return arguments


def run_stage(
    cfg: DictConfig, overrides: Sequence[str] = (), resume_command: str | None = None
) -> dict[str, Any]:
    """Run the stage named by `cfg.stage.name` in `cfg.run_dir`; write and return its metrics."""
    from posttrain.reporting import save_resolved_config, short_config
    from posttrain.resume import check_resume, load_saved_config, save_overrides
    from posttrain.stages.kit import StageContext
    from posttrain.stages.registry import get_stage

    spec = get_stage(cfg.stage.name)
    # A dry run only builds shapes, so it needs no data or tokenizer.
    groups = ("model", "optim", "mesh") if cfg.dry_run else spec.groups
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if k.split(".")[0] in groups)
    if missing:
        raise ValueError(f"missing required config values (set them as key=value): {missing}")
    run_dir = Path(cfg.run_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    saved = load_saved_config(run_dir)
    if saved is not None and not cfg.dry_run:
        for line in check_resume(saved, resolved, bool(cfg.get("force_resume")), str(run_dir)):
            print(line, file=sys.stderr)
    ctx = StageContext(cfg, spec, resume_command)
    log.info("%s", short_config(cfg, overrides=list(overrides)))
    if ctx.is_main and not cfg.dry_run:
        save_resolved_config(run_dir, cfg)
        save_overrides(run_dir, list(overrides))
    print(f"[{spec.name}] run directory: {run_dir}", flush=True)
    metrics = spec.run(ctx)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # metrics.json marks a finished stage (recipes skip it); an interrupted one must resume.
        name = "interrupted.json" if metrics.get("interrupted") else "metrics.json"
        if cfg.dry_run:  # a report, not a finished stage
            name = "dry_run.json"
        text = json.dumps(metrics, indent=2, sort_keys=True, ensure_ascii=False)
        (run_dir / name).write_text(text, encoding="utf-8")
        if name == "metrics.json":
            (run_dir / "interrupted.json").unlink(missing_ok=True)
    return metrics


HOST_ALLOCATORS = ("auto", "reuse", "default")


def reuses_host_memory(cfg: DictConfig) -> bool:
    """Whether this run sets the host allocator to reuse freed memory: `auto` does so when the
    run (or any stage of its recipe) trains. With it, CPU train steps are 27-33% shorter and
    dispatch-bound decoding ~14% slower (one malloc arena for all threads)."""
    from posttrain.stages.registry import stage_specs

    if cfg.host_allocator not in HOST_ALLOCATORS:
        raise ValueError(
            f"host_allocator must be one of {HOST_ALLOCATORS}, got {cfg.host_allocator!r}"
        )
    if cfg.host_allocator != "auto":
        return cfg.host_allocator == "reuse"
    specs = stage_specs()
    if cfg.recipe:
        from posttrain.pipeline import load_recipe

        stages = load_recipe(cfg.recipe)["stages"]
        return any(specs[stage["type"]].trains for stage in stages if stage["type"] in specs)
    return cfg.stage.name in specs and specs[cfg.stage.name].trains


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    """The Hydra job: one stage, or a recipe."""
    import absl.logging
    from hydra.core.hydra_config import HydraConfig

    from posttrain.compilation_cache import configure_compilation_cache
    from posttrain.host_memory import configure_host_allocator

    if reuses_host_memory(cfg):
        configure_host_allocator()  # before JAX starts its threads
    configure_compilation_cache(cfg.get("compilation_cache"))
    absl.logging.set_verbosity("warning")  # Orbax narrates every save at INFO
    if cfg.recipe:
        run_recipe(cfg)
        return
    overrides = list(HydraConfig.get().overrides.task)
    metrics = run_stage(cfg, overrides)
    shown = {k: v for k, v in metrics.items() if not isinstance(v, list | dict)}
    log.info("metrics: %s", json.dumps(shown, sort_keys=True, ensure_ascii=False))


def run_recipe(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """Run the stages of `cfg.recipe` in `cfg.pipeline_dir` (default runs/pipelines/<name>)."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    from posttrain.pipeline import load_recipe, run_pipeline

    recipe = load_recipe(cfg.recipe)
    pipeline_dir = cfg.pipeline_dir or f"runs/pipelines/{recipe['name']}"
    # Command-line overrides other than the recipe's own keys apply to every stage.
    own = ("recipe=", "pipeline_dir=", "redo=", "hydra.")
    extra = [o for o in HydraConfig.get().overrides.task if not o.startswith(own)]
    redo = cfg.get("redo") or []
    return run_pipeline(
        cfg.recipe,
        pipeline_dir,
        extra,
        lambda overrides: compose(config_name="config", overrides=overrides),
        run_stage,
        stage_overrides=list(_RECIPE_STAGE_OVERRIDES),
        redo=[redo] if isinstance(redo, str) else list(redo),
        params=list(_RECIPE_PARAMS),
        dry_run=bool(cfg.dry_run),
        command=f"posttrain recipe={cfg.recipe} pipeline_dir={pipeline_dir}",
    )


def main() -> None:
    """Entry point of the `posttrain` console command."""
    try:
        arguments = prepare_arguments(sys.argv[1:])
    except (OverrideError, FileNotFoundError, ValueError) as error:
        print(f"Error: {error}", file=sys.stderr)
        sys.exit(1)
    sys.argv = [sys.argv[0], *arguments]
    hydra_main()


if __name__ == "__main__":
    main()
