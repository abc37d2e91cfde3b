"""What an exported checkpoint directory carries besides its weights: the tokenizer it was
trained with (`tokenizer.model`) and stage metadata such as a reward model's preamble
(`posttrain.json`), so later stages need not be told them again."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

TOKENIZER_FILE = "tokenizer.model"
METADATA_FILE = "posttrain.json"


class TokenizerMismatchError(ValueError):
    """A stage was given a tokenizer other than the one its checkpoint was trained with."""


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def resolve_tokenizer(given: str | None, checkpoint: str | Path | None) -> str:
    """The tokenizer file to use: the one given, or the one a checkpoint directory carries;
    refuses a given tokenizer that differs from the checkpoint's, naming both."""
    bundled = Path(checkpoint) / TOKENIZER_FILE if checkpoint else None
    has_bundled = bundled is not None and bundled.exists()
    if given and has_bundled and file_digest(given) != file_digest(bundled):
        raise TokenizerMismatchError(
            f"tokenizer {given} differs from {bundled}, the one checkpoint {checkpoint} was "
            f"trained with; drop the tokenizer setting to use the checkpoint's"
        )
    if given:
        if not Path(given).exists():
            raise FileNotFoundError(f"tokenizer {given} not found")
        return str(given)
    if has_bundled:
        return str(bundled)
    where = f"checkpoint {checkpoint} carries no {TOKENIZER_FILE}; " if checkpoint else ""
    raise ValueError(f"{where}set the stage's tokenizer (a sentencepiece .model file)")


def bundle_tokenizer(directory: str | Path, tokenizer: str | Path, **extra: Any) -> None:
    """Copy the tokenizer into an exported directory (and write `extra` fields, e.g. a reward
    model's preamble, to the metadata file) so later stages need not be told them again."""
    directory = Path(directory)
    target = directory / TOKENIZER_FILE
    if Path(tokenizer).resolve() != target.resolve():
        tmp = directory / f".{TOKENIZER_FILE}.tmp"
        shutil.copyfile(tokenizer, tmp)
        tmp.replace(target)
    if extra:
        tmp = directory / ".posttrain.json.tmp"
        tmp.write_text(json.dumps(extra, ensure_ascii=False, indent=2), encoding="utf-8")
        tmp.replace(directory / METADATA_FILE)


def export_metadata(directory: str | Path) -> dict[str, Any]:
    """What `bundle_tokenizer` wrote besides the tokenizer (empty when nothing)."""
    path = Path(directory) / METADATA_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
