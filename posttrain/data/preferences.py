"""Preference data: (prompt, chosen, rejected[, margin, label]) rows -> reward-model token rows.

The reward model reads `<bos><start_of_turn>user\n{preamble}{prompt}<end_of_turn>\n
<start_of_turn>model\n{response}<end_of_turn>` and is scored at that final `<end_of_turn>`. A
preamble (an instruction to the reward model, never shown to the policy) is prepended to the
user turn when the config gives one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from posttrain.data.prompts import DataError
from posttrain.tokenizer import END_OF_TURN_ID, PAD_ID, GemmaTokenizer


class PreferenceRows(NamedTuple):
    """Right-padded token rows of both sides [n, L], and per-pair margin and label [n]."""

    chosen: np.ndarray
    chosen_segments: np.ndarray
    rejected: np.ndarray
    rejected_segments: np.ndarray
    margin: np.ndarray
    label: np.ndarray


@dataclasses.dataclass
class PreferenceStats:
    """What happened to the rows."""

    rows: int = 0
    pairs: int = 0
    malformed_skipped: int = 0
    dropped_overlong: int = 0


def _text(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: '{key}' must be a non-empty string, got {value!r:.60}")
    return value


def encode_for_reward(
    tokenizer: GemmaTokenizer, prompt: str, response: str, preamble: str | None
) -> list[int]:
    """Token ids ending at the response's `<end_of_turn>` (the scored position)."""
    user = f"{preamble}\n\n{prompt}" if preamble else prompt
    ids = tokenizer.encode_chat(
        [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    )
    last = len(ids) - 1 - ids[::-1].index(END_OF_TURN_ID)
    return ids[: last + 1]


def build_preferences(
    rows: Sequence[dict[str, Any]],
    tokenizer: GemmaTokenizer,
    max_length: int,
    source: str,
    preamble: str | None = None,
    skip_malformed: bool = False,
) -> tuple[PreferenceRows, PreferenceStats]:
    """Tokenize preference rows; a malformed pair names its file and row unless skipped."""
    stats = PreferenceStats(rows=len(rows))
    sides: list[tuple[list[int], list[int], float, float]] = []
    for index, row in enumerate(rows):
        where = f"{source}: row {index}"
        try:
            prompt = _text(row, "prompt", where)
            chosen, rejected = _text(row, "chosen", where), _text(row, "rejected", where)
            margin = float(row.get("margin") or 0.0)
            label = float(row["label"]) if row.get("label") is not None else 1.0
            if not 0.0 <= label <= 1.0:
                raise DataError(f"{where}: 'label' must be a probability in [0, 1], got {label}")
        except (DataError, TypeError, ValueError) as error:
            if not skip_malformed:
                raise DataError(
                    str(error) if str(error).startswith(source) else f"{where}: {error}"
                ) from error
            stats.malformed_skipped += 1
            continue
        good = encode_for_reward(tokenizer, prompt, chosen, preamble)
        bad = encode_for_reward(tokenizer, prompt, rejected, preamble)
        if max(len(good), len(bad)) > max_length:
            # Truncating would cut away the scored token, so over-long pairs are dropped.
            stats.dropped_overlong += 1
            continue
        sides.append((good, bad, margin, label))
    if not sides:
        raise DataError(f"{source}: no usable preference pairs ({stats})")
    stats.pairs = len(sides)

    def pad(sequences: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.full((len(sequences), max_length), PAD_ID, np.int32)
        segments = np.zeros((len(sequences), max_length), np.int32)
        for i, ids in enumerate(sequences):
            tokens[i, : len(ids)] = ids
            segments[i, : len(ids)] = 1
        return tokens, segments

    chosen_tokens, chosen_segments = pad([s[0] for s in sides])
    rejected_tokens, rejected_segments = pad([s[1] for s in sides])
    rows_out = PreferenceRows(
        chosen_tokens,
        chosen_segments,
        rejected_tokens,
        rejected_segments,
        np.asarray([s[2] for s in sides], np.float32),
        np.asarray([s[3] for s in sides], np.float32),
    )
    return rows_out, stats
