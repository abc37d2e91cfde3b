"""`<run_dir>/metrics.jsonl`: one JSON object per logged step, readable with `jq` or pandas.

log = MetricsLog(run_dir)               # in the stage, before training
log.write(step, {"loss": 1.2, "lr": 3e-4, "grad_norm": 0.8, "tokens_per_second": 5e3})
log.close()
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.reporting._files import is_writer, write_atomically

METRICS_FILE = "metrics.jsonl"


def json_value(value: Any) -> Any:
    """`value` as plain JSON: numbers (numpy and JAX scalars too) as floats or ints, NaN/inf
    as null (strict JSON has no NaN), containers element by element, anything else as str."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, np.ndarray | np.generic) or hasattr(value, "__array__"):
        array = np.asarray(value)
        if array.ndim == 0:
            value = array.item()
            if isinstance(value, bool | str):
                return value
        else:
            return [json_value(v) for v in array.tolist()]
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    return str(value)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a torn last line (the run was killed mid-write) is skipped."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


class MetricsLog:
    """Appends `{"step": s, key: value, ...}` lines to `<run_dir>/metrics.jsonl` (process 0 only).

    Each line is flushed, so a killed run keeps every line it wrote. A resumed run repeats the
    steps after its checkpoint, so before its first line the log drops every line at or after
    the step it starts from (or, given `resume_step`, every line after it): the file never
    holds a step twice.
    """

    def __init__(self, run_dir: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self._writer = is_writer()
        self._file = None
        self._trimmed = False
        if resume_step is not None:
            self._trim(last_kept=resume_step)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one line for `step` (keys as given, values as plain JSON)."""
        if not self._writer:
            return
        if self._file is None:
            if not self._trimmed:
                self._trim(last_kept=int(step) - 1)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        row = {"step": int(step), **{str(k): json_value(v) for k, v in metrics.items()}}
        # ensure_ascii=False keeps Japanese samples readable in the file.
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file (writing again reopens it for appending)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _trim(self, last_kept: int) -> None:
        self._trimmed = True
        if not self._writer or not self.path.exists():
            return
        rows = [row for row in read_metrics(self.path) if row["step"] <= last_kept]
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        write_atomically(self.path, text)
