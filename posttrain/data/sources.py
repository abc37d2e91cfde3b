"""Rows from a data source: a local JSONL / JSON / Parquet file (or a directory of them) or a
Hugging Face Hub dataset, with optional column renaming, and errors that name file and line.

Where a row came from is kept with it (`SourceRows.locations`) so that every later error
names it the same way: `train.jsonl line 7` (1-based line of a JSONL or JSON file),
`train.parquet row 6 (0-based)` or `owner/name (split train) row 6 (0-based)`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

SUPPORTED_FORMATS = (".jsonl", ".json", ".parquet")
_SUPPORTED = ", ".join(SUPPORTED_FORMATS)
# A hub dataset is `name` or `owner/name`; anything else that does not exist is a local path.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# A suffix of letters only is a file extension (`.csv`, `.txt`); `.5` in `OpenHermes-2.5` is not.
_EXTENSION = re.compile(r"\.[A-Za-z]{1,8}")
# Files named for different splits in one directory would be mixed into one set of rows.
_SPLIT_PREFIX = re.compile(r"(train|validation|valid|val|test|eval|dev)(?=[-_.]|$)")

Record = tuple[str, Any, str | None]  # (location, parsed value, problem or None)


class DataError(ValueError):
    """A malformed data file or row; the message names the file and the line or row."""


class SourceRows(list):
    """Rows (dicts) with the location of each, e.g. "train.jsonl line 7", for messages."""

    def __init__(self, rows: Sequence[dict[str, Any]] = (), locations: Sequence[str] = ()):
        super().__init__(rows)
        self.locations = list(locations)


def row_location(rows: Sequence[dict[str, Any]], source: str, index: int) -> str:
    """Where row `index` of `rows` came from: its file line if known, else its 0-based index."""
    locations = getattr(rows, "locations", None)
    if locations is not None and len(locations) == len(rows):
        return locations[index]
    return f"{source} row {index} (0-based)"


def check_columns(columns: Mapping[str, str] | None, name: str = "columns") -> dict[str, str]:
    """A column mapping {their name: our name} as a dict; two columns mapped to one name fail."""
    columns = dict(columns or {})
    for theirs, ours in columns.items():
        if not (isinstance(theirs, str) and isinstance(ours, str) and theirs and ours):
            raise DataError(f"{name}: {theirs!r}: {ours!r} must map a column name to a name")
    targets = list(columns.values())
    doubled = sorted({ours for ours in targets if targets.count(ours) > 1})
    if doubled:
        raise DataError(f"{name}: several columns are mapped to {doubled}")
    return columns


def map_columns(row: dict[str, Any], columns: Mapping[str, str], where: str) -> dict[str, Any]:
    """The row with its columns renamed by `columns` ({their name: our name}).

    Unmapped columns are kept; a mapped column wins over one of our name already in the row.
    Alpaca rule: when a column is mapped to `prompt` and the row has an unmapped `input` that
    is a non-empty string, it is appended to the prompt after a blank line (Alpaca's `input`
    is the context the instruction applies to).
    """
    if not columns:
        return row
    missing = [theirs for theirs in columns if row.get(theirs) is None]
    if missing:
        wanted = ", ".join(f"{theirs!r} (mapped to {columns[theirs]!r})" for theirs in missing)
        raise DataError(f"{where}: column(s) {wanted} missing or null; the row has {sorted(row)}")
    mapped = {key: value for key, value in row.items() if key not in columns}
    mapped.update({ours: row[theirs] for theirs, ours in columns.items()})
    context, prompt = mapped.get("input"), mapped.get("prompt")
    alpaca = "prompt" in columns.values() and "input" not in {*columns, *columns.values()}
    if alpaca and isinstance(prompt, str) and isinstance(context, str) and context.strip():
        mapped["prompt"] = f"{prompt}\n\n{context}"
        del mapped["input"]
    return mapped


def _looks_local(source: str, path: Path) -> bool:
    if source.startswith(("/", "./", "../", "~")):
        return True
    if not _HUB_NAME.fullmatch(source):
        return True  # no hub dataset is named like this (`a/b/c`, a Windows `data\train`)
    if path.suffix in SUPPORTED_FORMATS or _EXTENSION.fullmatch(path.suffix):
        return True
    return "/" in source and path.parent.exists()  # e.g. `data/train` where `data/` exists


def local_files(source: str) -> list[Path] | None:
    """The local files `source` names, or None for a hub dataset name; a DataError when it
    is (or looks like) a local path but names no readable file."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUPPORTED_FORMATS)
        if not files:
            raise DataError(f"{source}: a directory with no {_SUPPORTED} files")
        splits = {match[1] for p in files if (match := _SPLIT_PREFIX.match(p.name))}
        if len(splits) > 1:
            names = ", ".join(p.name for p in files)
            raise DataError(f"{source}: holds files of several splits ({names}); name one file")
        return files
    if path.is_file():
        if path.suffix not in SUPPORTED_FORMATS:
            kind = f"format {path.suffix!r}" if path.suffix else "file without an extension"
            raise DataError(f"{source}: unsupported {kind}; supported: {_SUPPORTED}")
        return [path]
    if not _looks_local(source, path):
        return None
    if path.suffix and path.suffix not in SUPPORTED_FORMATS:
        raise DataError(f"{source}: unsupported format {path.suffix!r}; supported: {_SUPPORTED}")
    guesses = [str(path) + ext for ext in SUPPORTED_FORMATS if Path(str(path) + ext).is_file()]
    hint = f"; did you mean {guesses[0]}?" if guesses else ""
    raise DataError(
        f"{source}: no such file or directory (local data is {_SUPPORTED} or a directory of "
        f"them; a hub dataset is named `name` or `owner/name`){hint}"
    )


def _json_problem(error: json.JSONDecodeError) -> str:
    return f"not valid JSON ({error.msg} at column {error.colno})"


def _jsonl_records(path: Path, name: str) -> Iterator[Record]:
    """One record per non-blank line, read as bytes so that a bad encoding names its line."""
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            where = f"{name} line {number}"
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                yield where, None, f"not UTF-8 ({error.reason} at byte {error.start} of the line)"
                continue
            if not text.strip():
                continue
            try:
                yield where, json.loads(text), None
            except json.JSONDecodeError as error:
                yield where, None, _json_problem(error)


def _json_array_records(text: str, name: str) -> Iterator[Record]:
    """The items of a top-level JSON list, each located at the line where it starts."""
    decoder, space = json.JSONDecoder(), re.compile(r"\s*")
    index, line, counted = text.index("[") + 1, 1, 0
    while True:
        index = space.match(text, index).end()
        if text.startswith("]", index):
            if space.match(text, index + 1).end() != len(text):
                line += text.count("\n", counted, index)
                raise DataError(f"{name} line {line}: text after the closing ']'")
            return
        line, counted = line + text.count("\n", counted, index), index
        try:
            value, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError as error:
            # The list cannot be resynchronised after a broken item, so this is never skipped.
            raise DataError(
                f"{name} line {error.lineno}: {_json_problem(error)}; a broken JSON list "
                "cannot be skipped item by item"
            ) from error
        yield f"{name} line {line}", value, None
        index = space.match(text, index).end()
        if text.startswith(",", index):
            index += 1
        elif not text.startswith("]", index):
            line += text.count("\n", counted, index)
            raise DataError(f"{name} line {line}: expected ',' or ']' after the item")


def _json_records(path: Path, name: str) -> Iterator[Record]:
    """A .json file: a list of objects, or JSON lines (one object per line)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(f"{name} line {line}: not UTF-8 ({error.reason})") from error
    if text.lstrip().startswith("["):
        yield from _json_array_records(text, name)
        return
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield f"{name} line {number}", json.loads(line), None
        except json.JSONDecodeError as error:
            hint = "; a .json file holds a list of objects or one object per line"
            yield f"{name} line {number}", None, _json_problem(error) + hint


def _parquet_records(path: Path, name: str) -> Iterator[Record]:
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise DataError(f"{name}: not a readable Parquet file ({error})") from error
    for index, row in enumerate(table.to_pylist()):
        yield f"{name} row {index} (0-based)", row, None


def _hub_records(source: str, split: str) -> Iterator[Record]:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        dataset = datasets.load_dataset(source, split=split)
    except DatasetNotFoundError as error:
        raise DataError(
            f"{source}: not a local file and not found on the Hugging Face Hub ({error}); "
            f"local data is {_SUPPORTED} or a directory of them"
        ) from error
    for index, row in enumerate(dataset):
        yield f"{source} (split {split}) row {index} (0-based)", row, None


_READERS = {".jsonl": _jsonl_records, ".json": _json_records, ".parquet": _parquet_records}


def read_rows(
    source: str,
    split: str = "train",
    *,
    skip_malformed: bool = False,
    columns: Mapping[str, str] | None = None,
) -> tuple[SourceRows, int]:
    """(rows, malformed rows skipped) of a local file, a directory of them or a hub dataset.

    A line that is not valid JSON or UTF-8, a row that is not an object and a row missing a
    mapped column raise a DataError naming file and line, or with `skip_malformed` are skipped
    and counted. `columns` renames columns ({their name: our name}, see `map_columns`). A local
    file is read whatever `split` says; a directory as all its data files, which must not
    mix splits (`train-0.parquet`, `train-1.parquet`, not `train.jsonl` with `eval.jsonl`).
    """
    columns = check_columns(columns)
    files = local_files(source)
    if files is None:
        records: Iterator[Record] = _hub_records(source, split)
    else:
        # A single file is named as the user wrote it; a directory's files by their paths.
        names = [source] if len(files) == 1 and Path(source).expanduser().is_file() else files
        records = (
            record
            for path, name in zip(files, names, strict=True)
            for record in _READERS[path.suffix](path, str(name))
        )
    rows, locations, skipped = [], [], 0
    for where, value, problem in records:
        try:
            if problem is not None:
                raise DataError(f"{where}: {problem}")
            if not isinstance(value, dict):
                kind = type(value).__name__
                raise DataError(f"{where}: not a JSON object (got {kind} {value!r:.60})")
            rows.append(map_columns(value, columns, where))
            locations.append(where)
        except DataError:
            if not skip_malformed:
                raise
            skipped += 1
    return SourceRows(rows, locations), skipped
