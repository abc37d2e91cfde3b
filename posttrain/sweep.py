"""Sweeps: job directories named by their swept values, and one table of every job's result.

    posttrain -m stage=sft optim.lr=1e-3,3e-3 seed=0,1
    # jobs in <sweep_dir>/0_optim.lr=0.001,seed=0, 1_optim.lr=0.001,seed=1, ...
    # and, once all have run, <sweep_dir>/sweep.md:
    # | job | optim.lr | seed | eval_loss | eval_exact_match |

`sweep_subdir_overrides(sys.argv[1:])` gives the Hydra overrides that name the directories;
`SweepTable` is the Hydra callback that writes the table (configured under `hydra.callbacks`).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from posttrain.reporting._files import write_atomically
from posttrain.reporting._summary import SUMMARY_JSON, is_scalar, markdown_table

SWEEP_TABLE_FILE = "sweep.md"
DIRNAME_RESOLVER = "posttrain_dirname"
SUBDIR = f"${{hydra.job.num}}_${{{DIRNAME_RESOLVER}:${{hydra.job.override_dirname}}}}"
# Hydra's command-line flags that take a value; everything else not starting with `-` is an
# override (hydra/_internal/utils.py, get_args_parser).
VALUE_FLAGS = frozenset(
    {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--cfg", "-c"}
    | {"--package", "-p", "--experimental-rerun"}
)
INFO_TOPICS = frozenset({"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"})
# Most file systems allow 255 bytes per name; the job number keeps a cut name unique.
MAX_DIRNAME_BYTES = 200


def safe_dirname(text: str) -> str:
    """`text` as one directory name: path separators, spaces and quotes become `_`, cut to
    fit a file system's name limit (the job number in front keeps cut names unique)."""
    name = re.sub(r"[^\w.,=+-]", "_", str(text))
    return name.encode("utf-8")[:MAX_DIRNAME_BYTES].decode("utf-8", errors="ignore")


if not OmegaConf.has_resolver(DIRNAME_RESOLVER):
    # Registered on import: Hydra resolves `hydra.sweep.subdir` in every job's process, and
    # each one imports this module when it unpickles the SweepTable callback.
    OmegaConf.register_new_resolver(DIRNAME_RESOLVER, safe_dirname)


def command_line_overrides(argv: Sequence[str]) -> tuple[bool, list[str]]:
    """(whether `argv` asks for a multirun, its overrides), without Hydra's parser exiting
    on `--help`."""
    multirun, overrides, index = False, [], 0
    while index < len(argv):
        arg = argv[index]
        flag = arg.split("=", 1)[0]
        if flag in ("-m", "--multirun"):
            multirun = True
        elif flag in VALUE_FLAGS:
            index += "=" not in arg  # `--config-name x` takes the next word
        elif flag in ("-i", "--info"):
            index += "=" not in arg and index + 1 < len(argv) and argv[index + 1] in INFO_TOPICS
        elif not arg.startswith("-"):
            overrides.append(arg)
            multirun |= arg in ("hydra.mode=MULTIRUN", "hydra.mode=multirun")
        index += 1
    return multirun, overrides


def swept_keys(overrides: Sequence[str]) -> list[str]:
    """The keys of the overrides that sweep: a comma list, `range(`, `choice(`, `glob(`,
    `interval(` (Hydra's own parser decides, so quoting and nesting are as Hydra reads them)."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [o.key_or_group for o in parsed if o.is_sweep_override() and not o.is_hydra_override()]


def sweep_subdir_overrides(argv: Sequence[str]) -> list[str]:
    """Extra Hydra overrides naming each job directory of a `-m` run by its swept values
    (`3_optim.lr=0.003,seed=1`); [] when `argv` is no sweep or already sets the subdir."""
    multirun, overrides = command_line_overrides(argv)
    if not multirun or any(o.startswith("hydra.sweep.subdir=") for o in overrides):
        return []
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return []  # a malformed override: Hydra itself will name it
    task = [o for o in parsed if not o.is_hydra_override()]
    swept = {o.key_or_group for o in task if o.is_sweep_override()}
    if not swept:
        return []
    fixed = sorted({o.key_or_group for o in task} - swept)
    # Quoted, so that group keys (`hydra/launcher`) and dotted keys parse as plain strings.
    exclude = ",".join(f"'{key}'" for key in fixed)
    return [
        f"hydra.sweep.subdir='{SUBDIR}'",  # quoted: the grammar rejects nested ${} bare
        f"hydra.job.config.override_dirname.exclude_keys=[{exclude}]",
    ]


def _job_overrides(job_dir: Path) -> dict[str, str]:
    lines = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    values = {}
    for line in lines:
        try:
            (override,) = OverridesParser.create().parse_overrides([line])
            key = override.key_or_group
            value = "" if override.is_delete() else override.get_value_element_as_str()
        except HydraException:
            key, _, value = line.partition("=")
        values[key] = value
    return values


def _job_result(job_dir: Path) -> tuple[str, dict[str, Any], list[str]]:
    """(status, metrics, headline keys) from the files a stage leaves in its run directory."""
    if (job_dir / SUMMARY_JSON).exists():
        summary = json.loads((job_dir / SUMMARY_JSON).read_text(encoding="utf-8"))
        return "finished", summary.get("metrics", {}), summary.get("headline", [])
    if (job_dir / "metrics.json").exists():
        return "finished", json.loads((job_dir / "metrics.json").read_text()), []
    if (job_dir / "interrupted.json").exists():
        return "interrupted", json.loads((job_dir / "interrupted.json").read_text()), []
    return "no metrics", {}, []


def _job_number(name: str) -> tuple[int, str]:
    digits = re.match(r"\d+", name)
    return (int(digits.group()) if digits else -1, name)


def sweep_table(
    sweep_dir: str | Path,
    swept: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    max_metrics: int = 6,
) -> str:
    """A markdown table with a row per job under `sweep_dir`: its swept values (`swept`, or
    the override keys whose values differ between jobs), then its headline metrics (`metrics`,
    or the stages' headline keys, or else the numeric metrics that differ between jobs)."""
    sweep_dir = Path(sweep_dir)
    job_dirs = sorted(
        (p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")),
        key=lambda d: _job_number(d.relative_to(sweep_dir).as_posix()),
    )
    if not job_dirs:
        raise FileNotFoundError(f"no Hydra job directories (.hydra/overrides.yaml) in {sweep_dir}")
    jobs = [(d, _job_overrides(d), *_job_result(d)) for d in job_dirs]
    if not swept:
        keys = list(dict.fromkeys(k for _, values, *_ in jobs for k in values))
        swept = [k for k in keys if len({values.get(k) for _, values, *_ in jobs}) > 1]
    if not metrics:
        metrics = list(dict.fromkeys(k for *_, headline in jobs for k in headline))
    if not metrics:
        results = [m for _, _, status, m, _ in jobs if status == "finished"]
        numeric = dict.fromkeys(
            k
            for m in results
            for k, v in m.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        )
        metrics = [k for k in numeric if len({repr(m.get(k)) for m in results}) > 1]
        metrics = metrics[:max_metrics]
    show_status = any(status != "finished" for _, _, status, _, _ in jobs)
    columns = ["job", *swept, *metrics] + (["status"] if show_status else [])
    rows = []
    for job_dir, values, status, result, _ in jobs:
        name = job_dir.relative_to(sweep_dir).as_posix()
        number, _ = _job_number(name)
        row = [number if number >= 0 else name, *(values.get(k, "") for k in swept)]
        row += [result.get(k) if is_scalar(result.get(k)) else "…" for k in metrics]
        rows.append(row + ([status] if show_status else []))
    return markdown_table(columns, rows)


def _is_head_process() -> bool:
    # Only a multi-host job (jax.distributed joined) has other processes; asking JAX in any
    # other case would start its backend on the machine that merely launched the jobs.
    jax = sys.modules.get("jax")
    return jax is None or not jax.distributed.is_initialized() or jax.process_index() == 0


class SweepTable(Callback):
    """Hydra callback: when a multirun ends, print one markdown table of its jobs and write
    it to `<sweep_dir>/sweep.md`."""

    def __init__(self, metrics: Sequence[str] | None = None, max_metrics: int = 6) -> None:
        self.metrics = list(metrics or [])
        self.max_metrics = max_metrics

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Collect every job's summary.json (or metrics.json) into the sweep table."""
        if not _is_head_process():
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
        table = sweep_table(sweep_dir, swept_keys(task), self.metrics, self.max_metrics)
        text = f"# sweep {sweep_dir}\n\n{table}\n"
        write_atomically(sweep_dir / SWEEP_TABLE_FILE, text)
        print(text, flush=True)
