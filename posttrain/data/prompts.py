"""Prompt sets for sampling and RL: text files, local JSON/JSONL/Parquet, or hub datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Reading lives in sources.py; DataError and read_rows are importable from here too.
from posttrain.data.sources import DataError, read_rows, row_location

__all__ = ["DataError", "load_prompts", "load_rows", "read_rows"]


def load_rows(source: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a local JSON/JSONL/Parquet file or a Hugging Face dataset name (see read_rows)."""
    return read_rows(source, split)[0]


def load_prompts(source: str, column: str = "prompt", split: str = "train") -> list[Any]:
    """Prompts from `source`: one per line of a .txt file, or the `column` (a string, or a
    `messages` list of chat turns) of each row of a table."""
    path = Path(source)
    if path.suffix == ".txt":
        if not path.exists():
            raise DataError(f"{source}: file not found")
        raw = path.read_bytes()
        try:
            lines = raw.decode("utf-8-sig").splitlines()
        except UnicodeDecodeError as error:
            line = raw.count(b"\n", 0, error.start) + 1
            raise DataError(f"{source} line {line}: not UTF-8 ({error.reason})") from error
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise DataError(f"{source}: no prompts")
        return prompts
    prompts = []
    rows = load_rows(source, split)
    for index, row in enumerate(rows):
        value = row.get(column)
        valid_text = isinstance(value, str) and value.strip()
        valid_chat = isinstance(value, list) and all(
            isinstance(turn, dict) and "role" in turn and "content" in turn for turn in value
        )
        if not (valid_text or valid_chat):
            raise DataError(
                f"{row_location(rows, source, index)}: no usable {column!r} "
                f"(expected a non-empty string or a list of chat turns), got {value!r:.80}"
            )
        prompts.append(value)
    if not prompts:
        raise DataError(f"{source}: no rows")
    return prompts
