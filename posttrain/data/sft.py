"""SFT data: rows -> Gemma chat tokens with a loss mask -> packed or padded batches.

Rows hold chat `messages` (a list of {role, content}) or `prompt` / `response` strings (other
schemas are renamed by `data.columns`, e.g. Alpaca's {instruction: prompt, output: response}). The
loss mask covers every model turn and its `<end_of_turn>`. Batches come from a deterministic,
seeded shuffle whose position (epoch, index) is part of the training checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from posttrain.data.sources import DataError, check_columns, read_rows, row_location
from posttrain.tokenizer import PAD_ID, GemmaTokenizer

OVERLONG = ("truncate", "drop")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where SFT examples come from and how they become batches."""

    train: str  # local .json/.jsonl/.parquet or a hub dataset name
    eval: str | None = None
    split: str = "train"
    max_length: int = 128  # tokens per row (an example longer than this is truncated or dropped)
    overlong: str = "truncate"
    skip_malformed: bool = False  # count and skip bad rows instead of stopping
    packing: bool = False  # several examples per row, separated by segment ids
    batch_size: int = 8  # rows per optimizer step (all micro-batches together)
    seed: int = 0
    # {their column: ours} applied when reading, before validation (see sources.map_columns);
    # None (the YAML default) = no renaming.
    columns: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "columns", check_columns(self.columns, "data.columns"))
        if self.overlong not in OVERLONG:
            raise ValueError(f"data.overlong={self.overlong!r}; expected one of {OVERLONG}")
        if self.max_length < 2 or self.batch_size < 1:
            raise ValueError("data.max_length must be >= 2 and data.batch_size >= 1")


class Example(NamedTuple):
    """One tokenized conversation."""

    tokens: np.ndarray  # [n] int32
    loss_mask: np.ndarray  # [n] bool: True on model-turn tokens


@dataclasses.dataclass
class DataStats:
    """What happened to the rows; logged by the stage."""

    rows: int = 0
    examples: int = 0
    malformed_skipped: int = 0  # unparsable lines skipped when reading included
    truncated: int = 0
    dropped_overlong: int = 0


def row_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The conversation of a row, or a DataError naming `where` (file and line) and the problem."""
    if "messages" in row and row["messages"] is not None:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of turns")
        for turn in messages:
            if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
                raise DataError(f"{where}: every turn needs a string 'content', got {turn!r:.80}")
        if not any(turn.get("role") in ("assistant", "model") for turn in messages):
            raise DataError(f"{where}: no assistant/model turn to train on")
        if any(
            turn.get("role") in ("assistant", "model") and not turn["content"].strip()
            for turn in messages
        ):
            raise DataError(f"{where}: empty assistant response")
        return messages
    missing = [key for key in ("prompt", "response") if key not in row or row[key] is None]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing} (need 'messages' or prompt/response)")
    for key in ("prompt", "response"):
        if not isinstance(row[key], str):
            raise DataError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")
    if not row["response"].strip():
        raise DataError(f"{where}: empty response")
    return [
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": row["response"]},
    ]


def build_examples(
    rows: Sequence[dict[str, Any]],
    tokenizer: GemmaTokenizer,
    config: DataConfig,
    source: str,
    *,
    read_skipped: int = 0,
) -> tuple[list[Example], DataStats]:
    """Tokenize rows; malformed and over-long rows are handled as the config says, and counted.

    `read_skipped`: malformed lines `read_rows` already skipped, counted in `rows` and
    `malformed_skipped`. `config.columns` is applied by `read_rows`, not here.
    """
    stats = DataStats(rows=len(rows) + read_skipped, malformed_skipped=read_skipped)
    examples = []
    for index, row in enumerate(rows):
        where = row_location(rows, source, index)
        try:
            messages = row_messages(row, where)
            try:
                ids, mask = tokenizer.encode_chat_with_roles(messages)
            except ValueError as error:  # e.g. an unknown role; the tokenizer cannot name the row
                raise DataError(f"{where}: {error}") from error
        except DataError:
            if not config.skip_malformed:
                raise
            stats.malformed_skipped += 1
            continue
        if len(ids) > config.max_length:
            if config.overlong == "drop":
                stats.dropped_overlong += 1
                continue
            ids, mask = ids[: config.max_length], mask[: config.max_length]
            stats.truncated += 1
            if not any(mask):  # nothing left to learn from
                stats.dropped_overlong += 1
                continue
        examples.append(Example(np.asarray(ids, np.int32), np.asarray(mask, bool)))
    stats.examples = len(examples)
    if not examples:
        raise DataError(f"{source}: no usable examples ({stats})")
    return examples, stats


def load_examples(
    source: str, tokenizer: GemmaTokenizer, config: DataConfig
) -> tuple[list[Example], DataStats]:
    """Read (with `config.columns` and `config.skip_malformed`) and tokenize a source."""
    rows, skipped = read_rows(
        source, config.split, skip_malformed=config.skip_malformed, columns=config.columns
    )
    return build_examples(rows, tokenizer, config, source, read_skipped=skipped)


class Rows(NamedTuple):
    """Fixed-length training rows: tokens, loss mask and segment ids (0 = padding), [n, L]."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    segment_ids: np.ndarray


def to_rows(examples: Sequence[Example], length: int, packing: bool) -> Rows:
    """One example per row (right padding), or packed greedily in order (first fit)."""
    groups: list[list[Example]] = []
    if packing:
        used: list[int] = []
        for example in examples:
            for slot, filled in enumerate(used):
                if filled + len(example.tokens) <= length:
                    groups[slot].append(example)
                    used[slot] += len(example.tokens)
                    break
            else:
                groups.append([example])
                used.append(len(example.tokens))
    else:
        groups = [[example] for example in examples]
    tokens = np.full((len(groups), length), PAD_ID, np.int32)
    loss_mask = np.zeros((len(groups), length), bool)
    segment_ids = np.zeros((len(groups), length), np.int32)
    for row, group in enumerate(groups):
        start = 0
        for segment, example in enumerate(group, start=1):
            end = start + len(example.tokens)
            tokens[row, start:end] = example.tokens
            loss_mask[row, start:end] = example.loss_mask
            segment_ids[row, start:end] = segment
            start = end
    return Rows(tokens, loss_mask, segment_ids)


class BatchIterator:
    """Endless batches of rows in a seeded order, reshuffled every epoch; resumable.

    `rows` is any NamedTuple of arrays with a common first axis (SFT rows, preference pairs).
    """

    def __init__(self, rows: Any, batch_size: int, seed: int) -> None:
        if len(rows[0]) < batch_size:
            raise DataError(f"{len(rows[0])} rows cannot fill a batch of {batch_size}")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.epoch, self.index = 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rows[0]))

    def __next__(self) -> Any:
        """The next batch [batch_size, ...] of each array."""
        if self.index + self.batch_size > len(self.rows[0]):  # drop the ragged tail
            self.epoch, self.index = self.epoch + 1, 0
        picked = self._order()[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        return type(self.rows)(*(array[picked] for array in self.rows))

    def __iter__(self) -> BatchIterator:
        return self

    def state(self) -> dict[str, int]:
        """Position to store in a checkpoint."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from a stored position."""
        if state["seed"] != self.seed:
            raise ValueError(f"checkpoint data seed {state['seed']} differs from {self.seed}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
