"""`config.yaml`: the run's resolved config as plain YAML; and a few-line version for the console.

save_resolved_config(run_dir, cfg)
log.info("%s", short_config(cfg))   # the stage section and the command-line overrides
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from posttrain.reporting._files import is_writer, write_atomically

CONFIG_FILE = "config.yaml"
CONSOLE_WIDTH = 100


class _Absent:
    pass


_ABSENT = _Absent()


def _leaf(parent: DictConfig | ListConfig, key: Any, raw: Any) -> Any:
    if OmegaConf.is_missing(parent, key):
        return None  # a `???` this stage does not read: null in plain YAML
    try:
        value = parent[key]
    except (OmegaConfBaseException, ValueError):
        return raw  # an interpolation nothing here can resolve (e.g. `${hydra:...}` outside Hydra)
    return plain_config(value) if isinstance(value, DictConfig | ListConfig) else value


def plain_config(cfg: DictConfig | ListConfig) -> Any:
    """`cfg` as plain dicts and lists, resolved, missing values as None; an interpolation
    that cannot be resolved here is kept as written instead of failing the run."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    if isinstance(cfg, DictConfig):
        return {str(key): _leaf(cfg, key, value) for key, value in raw.items()}
    return [_leaf(cfg, index, value) for index, value in enumerate(raw)]


def save_resolved_config(run_dir: str | Path, cfg: DictConfig) -> Path:
    """Write `<run_dir>/config.yaml`, resolved and with unicode as is (process 0 only)."""
    path = Path(run_dir) / CONFIG_FILE
    if is_writer():
        text = yaml.safe_dump(plain_config(cfg), allow_unicode=True, sort_keys=False)
        write_atomically(path, text)
    return path


def _flat(value: Any, prefix: str) -> list[str]:
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flat(v, f"{prefix}{k}.")]
    return [f"{prefix[:-1]}={_short(value)}"]


def _short(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        # Quoted only when needed, so `tokenizer=tok.model` stays as typed.
        return json.dumps(value, ensure_ascii=False) if (not value or " " in value) else value
    if isinstance(value, list):
        return "[" + ",".join(_short(v) for v in value) + "]"
    return str(value)


def _command_line_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def short_config(
    cfg: DictConfig,
    keep: Sequence[str] = ("stage",),
    overrides: Sequence[str] | None = None,
    width: int = CONSOLE_WIDTH,
) -> str:
    """A few lines for the console: the `keep` sections as key=value, then the overrides (by
    default Hydra's command-line ones; a pipeline passes its stage's) with their values."""
    plain = plain_config(cfg)
    lines = []
    for section in keep:
        if section not in plain:
            raise KeyError(f"short_config: no section {section!r}; sections: {sorted(plain)}")
        value = plain[section]
        lines += _wrap(
            f"{section}:", _flat(value, "") if isinstance(value, dict) else [_short(value)], width
        )
    shown = []
    for override in _command_line_overrides() if overrides is None else overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=False)
        # A group choice (model=gemma2_2b) stays as typed: its value is a whole section; so
        # does a deletion or a key this config does not hold.
        is_leaf = "=" in override and not isinstance(value, DictConfig | ListConfig | _Absent)
        shown.append(f"{key}={_short(value)}" if is_leaf else override)
    if shown:
        lines += _wrap("overrides:", shown, width)
    return "\n".join(lines)


def _wrap(head: str, items: list[str], width: int) -> list[str]:
    # Packed item by item, so a quoted value with spaces is never split across lines.
    lines = [head]
    for item in items:
        if len(lines[-1]) + 1 + len(item) > width and lines[-1].strip() not in (head, ""):
            lines.append("   ")
        lines[-1] += " " + item
    return lines
