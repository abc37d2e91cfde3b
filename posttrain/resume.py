"""Resuming a run: the command line it was started with, and what a resume may change.

`posttrain resume=RUN_DIR [key=value ...]` re-runs the command saved in `RUN_DIR/overrides.yaml`
in the same directory (and so the same checkpoints and wandb run), with any new overrides on
top. Before any work the new config is compared with `RUN_DIR/config.yaml`: changes that cannot
alter the numbers already computed or still to come (logging, checkpoint cadence, evaluation
size, the mesh — same values to float tolerance, not bitwise) are listed as a warning; any
other change (a learning rate, the data, the model, the LR schedule's horizon
`optim.total_steps`, which follows `stage.steps` unless set) breaks exactness and is refused,
unless `force_resume=true`. So `stage.steps` may grow when `optim.total_steps` was set.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

OVERRIDES_FILE = "overrides.yaml"
CONFIG_FILE = "config.yaml"
# Keys that differ between any two launches and say nothing about the run's numbers.
IGNORED = (
    "run_dir",
    "resume",
    "force_resume",
    "force_memory",
    "dry_run",
    "recipe",
    "redo",
    "device_memory_gib",
    "compilation_cache",
)
# Keys a stage derives and saves: a random model takes its tokenizer's vocabulary (and a change
# of tokenizer is caught by its own key and by the tokenizer check).
DERIVED = ("model.vocab_size",)
# Changes that leave every remaining step's numbers as they were (mesh: to float tolerance).
SAFE_TO_CHANGE = (
    "logger.",
    "host_allocator",
    "coordinator",
    "mesh.",
    "stage.save_every",
    "stage.keep_checkpoints",
    "stage.sample_every",
    "stage.eval_batches",
    "stage.score_batch_size",
    "stage.exact_match_examples",
    "stage.max_new_tokens",
    "stage.skip_nonfinite",
    "pipeline_dir",
    # More steps on the same schedule: when the LR horizon follows stage.steps, its change shows
    # as optim.total_steps, which is refused; with optim.total_steps set, it only extends the run.
    "stage.steps",
)


class ResumeConflictError(ValueError):
    """A resume asked for changes that would make the resumed run differ from an unbroken one."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b': value} for every leaf of nested mappings (lists are leaves)."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= flatten(value, f"{prefix}{key}." if isinstance(value, Mapping) else f"{prefix}{key}")
        if isinstance(value, Mapping) and not value:
            out[f"{prefix}{key}"] = {}
    return out


def config_changes(old: Mapping, new: Mapping) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ between two resolved configs: {key: (old, new)}."""
    # A required value never set is `???` in a live config and null in a saved one.
    before, after = (
        {k: None if v == "???" else v for k, v in flatten(tree).items()} for tree in (old, new)
    )
    missing = object()
    changes = {}
    for key in sorted(set(before) | set(after)):
        if key.split(".")[0] in IGNORED or key in DERIVED:
            continue
        a, b = before.get(key, missing), after.get(key, missing)
        if a != b:
            changes[key] = (None if a is missing else a, None if b is missing else b)
    return changes


def is_safe(key: str) -> bool:
    """Whether changing `key` on resume keeps the run's numbers."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in SAFE_TO_CHANGE)


def check_resume(saved: Mapping, new: Mapping, force: bool, where: str) -> list[str]:
    """Warnings for the safe changes; ResumeConflictError listing the others (unless force)."""
    changes = config_changes(saved, new)
    lines = [f"  {key}: {a!r} -> {b!r}" for key, (a, b) in changes.items()]
    unsafe = [key for key in changes if not is_safe(key)]
    if unsafe and not force:
        raise ResumeConflictError(
            f"{where} was started with a different config; resuming with these changes would "
            f"not continue the same run:\n"
            + "\n".join(line for line, key in zip(lines, changes, strict=True) if key in unsafe)
            + "\nUndo them, start a new run directory, or pass force_resume=true to continue "
            "anyway (the result is then not the result of one unbroken run)."
        )
    if not changes:
        return []
    return [f"{where}: resuming with changed settings:", *lines]


def load_saved_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The resolved config a run saved, or None."""
    path = Path(run_dir) / CONFIG_FILE
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None


def save_overrides(run_dir: str | Path, overrides: list[str]) -> None:
    """Write the command-line overrides a run was started with (what `resume=` replays)."""
    path = Path(run_dir) / OVERRIDES_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(list(overrides), allow_unicode=True), encoding="utf-8")
    tmp.replace(path)


def override_key(override: str) -> str:
    """The key of a `key=value` override (without +, ++ or ~)."""
    return override.split("=", 1)[0].lstrip("+~")


def resume_arguments(run_dir: str | Path, new: list[str]) -> list[str]:
    """The saved overrides of `run_dir` with `new` ones replacing those of the same key, and
    the run pinned to `run_dir`."""
    path = Path(run_dir) / OVERRIDES_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{run_dir} is not a posttrain run directory (no {OVERRIDES_FILE}); "
            "resume=RUN_DIR takes the directory a stage printed when it started"
        )
    saved = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    replaced = {override_key(o) for o in new}
    pinned = {"run_dir", "hydra.run.dir", "resume"}
    kept = [o for o in saved if override_key(o) not in replaced | pinned]
    run_dir = str(run_dir)
    return [*kept, *new, f"run_dir={run_dir}", f"hydra.run.dir={run_dir}", f"resume={run_dir}"]
