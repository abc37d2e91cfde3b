"""`summary.md` and `summary.json`: what a finished stage reports, for people and for sweeps.

print(write_summary(run_dir, "warm", metrics, headline=["warm_eval_accuracy"],
                    tables={"members / WARM / ensemble": comparison_table(metrics, n)}))
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from posttrain.reporting._files import is_writer, write_atomically
from posttrain.reporting._metrics_log import json_value

SUMMARY_MD = "summary.md"
SUMMARY_JSON = "summary.json"
# A table passed by a stage: preformatted markdown, or (columns, rows).
Table = str | tuple[Sequence[str], Sequence[Sequence[Any]]]
# Lists longer than this are data (sampled answers, member paths), not a table cell.
MAX_LIST_CELL = 8


def format_value(value: Any) -> str:
    """A metric as a short table cell: 4 significant digits, large values without exponent."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.3e}"
        if abs(value) >= 1e4:
            return f"{value:.0f}" if value.is_integer() else f"{value:.1f}"
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(format_value(v) for v in value)
    return str(value)


def _cell(text: str) -> str:
    # A pipe would end the cell and a newline the row.
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers are right-aligned, cells escaped."""
    for index, row in enumerate(rows):
        if len(row) != len(columns):
            raise ValueError(f"table row {index} has {len(row)} cells for {len(columns)} columns")
    numeric = [
        bool(rows)
        and all(isinstance(r[c], int | float) and not isinstance(r[c], bool) for r in rows)
        for c in range(len(columns))
    ]
    lines = [
        "| " + " | ".join(_cell(str(c)) for c in columns) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(_cell(format_value(v)) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def is_scalar(value: Any) -> bool:
    """Whether a metric fits one table cell (a number, a string, or a short flat list)."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    return (
        isinstance(value, list | tuple)
        and len(value) <= MAX_LIST_CELL
        and all(isinstance(v, bool | int | float | str) for v in value)
    )


def write_summary(
    run_dir: str | Path,
    stage: str,
    metrics: Mapping[str, Any],
    headline: Sequence[str] | None = None,
    tables: Mapping[str, Table] | None = None,
) -> str:
    """Write `<run_dir>/summary.md` (the scalar metrics, `headline` first, then `tables`) and
    `summary.json`; returns the markdown, for the stage to print (files on process 0 only)."""
    run_dir = Path(run_dir)
    metrics = {str(k): json_value(v) for k, v in metrics.items()}
    headline = list(headline or [])
    rest = [k for k, v in metrics.items() if k not in headline and is_scalar(v)]
    # A headline metric the run never reached (it was interrupted) shows as "—", not vanishes.
    rows = [[k, metrics.get(k)] for k in headline] + [[k, metrics[k]] for k in rest]
    parts = [f"## {stage}: {run_dir}", markdown_table(["metric", "value"], rows)]
    plain_tables: dict[str, Any] = {}
    for title, table in (tables or {}).items():
        if isinstance(table, str):
            text, plain_tables[title] = table.strip(), {"markdown": table}
        else:
            columns, table_rows = list(table[0]), json_value(list(table[1]))
            text = markdown_table(columns, table_rows)
            plain_tables[title] = {"columns": columns, "rows": table_rows}
        parts += [f"### {title}", text]
    text = "\n\n".join(parts) + "\n"
    if is_writer():
        summary = dict(stage=stage, headline=headline, metrics=metrics, tables=plain_tables)
        write_atomically(run_dir / SUMMARY_MD, text)
        # ensure_ascii=False keeps Japanese answers readable in the file.
        write_atomically(run_dir / SUMMARY_JSON, json.dumps(summary, indent=2, ensure_ascii=False))
    return text
