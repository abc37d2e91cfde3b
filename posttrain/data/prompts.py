"""Prompt sets for sampling and RL: text files, local JSON/JSONL/Parquet, or hub datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """A malformed data file or row; the message names the file and the row."""


def load_rows(source: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a local JSON/JSONL/Parquet file or a Hugging Face dataset name."""
    import datasets

    path = Path(source)
    if path.suffix in _LOCAL_FORMATS:
        if not path.exists():
            raise DataError(f"{source}: file not found")
        dataset = datasets.load_dataset(
            _LOCAL_FORMATS[path.suffix], data_files=str(path), split="train"
        )
    else:
        dataset = datasets.load_dataset(source, split=split)
    return list(dataset)


def load_prompts(source: str, column: str = "prompt", split: str = "train") -> list[Any]:
    """Prompts from `source`: one per line of a .txt file, or the `column` (a string, or a
    `messages` list of chat turns) of each row of a table."""
    path = Path(source)
    if path.suffix == ".txt":
        if not path.exists():
            raise DataError(f"{source}: file not found")
        lines = path.read_text(encoding="utf-8").splitlines()
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise DataError(f"{source}: no prompts")
        return prompts
    prompts = []
    for index, row in enumerate(load_rows(source, split)):
        value = row.get(column)
        valid_text = isinstance(value, str) and value.strip()
        valid_chat = isinstance(value, list) and all(
            isinstance(turn, dict) and "role" in turn and "content" in turn for turn in value
        )
        if not (valid_text or valid_chat):
            raise DataError(
                f"{source}: row {index} has no usable {column!r} "
                f"(expected a non-empty string or a list of chat turns), got {value!r:.80}"
            )
        prompts.append(value)
    if not prompts:
        raise DataError(f"{source}: no rows")
    return prompts
