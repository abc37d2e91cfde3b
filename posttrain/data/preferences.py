"""Preference data: (prompt, chosen, rejected[, margin, label]) rows -> reward-model token rows.

The reward model reads `<bos><start_of_turn>user\n{preamble}{prompt}<end_of_turn>\n
<start_of_turn>model\n{response}<end_of_turn>` and is scored at that final `<end_of_turn>`. A
preamble (an instruction to the reward model, never shown to the policy) is prepended to the
user turn when the config gives one; a row's own `preamble` field overrides it ("" = none).
Other schemas are renamed by a column mapping, e.g. Stack Exchange paired / UltraFeedback-style
{question: prompt, response_j: chosen, response_k: rejected} (`STACK_EXCHANGE_COLUMNS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from posttrain.data.sources import DataError, check_columns, map_columns, read_rows, row_location
from posttrain.tokenizer import END_OF_TURN_ID, PAD_ID, GemmaTokenizer

# The mapping for pairs stored as question / preferred answer / other answer.
STACK_EXCHANGE_COLUMNS = {"question": "prompt", "response_j": "chosen", "response_k": "rejected"}


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
    malformed_skipped: int = 0  # unparsable lines skipped when reading included
    dropped_overlong: int = 0
    # The `pair_type` of every kept pair ("pairs" when the rows have none), for per-type metrics.
    pair_types: list[str] = dataclasses.field(default_factory=list, repr=False)

    def counts(self) -> dict[str, int]:
        """Row counts (and kept pairs per type) for a metrics file."""
        kept = {f"pairs_{t}": self.pair_types.count(t) for t in sorted(set(self.pair_types))}
        fields = ("rows", "pairs", "malformed_skipped", "dropped_overlong")
        return {name: getattr(self, name) for name in fields} | kept


def _text(row: dict[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: '{key}' must be a non-empty string, got {value!r:.60}")
    return value


Prompt = str | list[dict[str, str]]  # one user message, or the chat turns before the reply


def encode_for_reward(
    tokenizer: GemmaTokenizer, prompt: Prompt, response: str, preamble: str | None
) -> list[int]:
    """Token ids ending at the response's `<end_of_turn>` (the scored position); the preamble
    opens the conversation, a system prompt is merged into the first user turn."""
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if preamble:  # before everything, a system prompt included
        turns[0] = {**turns[0], "content": f"{preamble}\n\n{turns[0]['content']}"}
    ids = tokenizer.encode_chat(
        [*turns, {"role": "assistant", "content": response}], merge_system=True
    )
    last = len(ids) - 1 - ids[::-1].index(END_OF_TURN_ID)
    return ids[: last + 1]


def _turn_list(value: Any, key: str, where: str) -> list[dict[str, str]]:
    valid = (
        isinstance(value, list)
        and value
        and all(
            isinstance(t, dict)
            and t.get("role") in ("system", "user", "assistant", "model")
            and isinstance(t.get("content"), str)
            for t in value
        )
    )
    if not valid:
        raise DataError(
            f"{where}: '{key}' must be a non-empty string or a list of chat turns "
            f"{{role, content}}, got {value!r:.60}"
        )
    return [{"role": t["role"], "content": t["content"]} for t in value]


def pair_sides(row: dict[str, Any], where: str) -> tuple[Prompt, str, str]:
    """(prompt, chosen reply, rejected reply) of a row given as strings or as chat messages
    (`chosen`/`rejected` conversations ending with the reply, `prompt` optional)."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not (isinstance(chosen, list) or isinstance(rejected, list)):
        prompt = row.get("prompt")
        if not isinstance(prompt, str):
            prompt = _turn_list(prompt, "prompt", where)
        elif not prompt.strip():
            raise DataError(f"{where}: 'prompt' must be a non-empty string, got {prompt!r:.60}")
        return prompt, _text(row, "chosen", where), _text(row, "rejected", where)
    sides = {key: _turn_list(row.get(key), key, where) for key in ("chosen", "rejected")}
    for key, turns in sides.items():
        if turns[-1]["role"] not in ("assistant", "model") or not turns[-1]["content"].strip():
            raise DataError(f"{where}: '{key}' must end with a non-empty assistant turn")
    context = sides["chosen"][:-1]
    if sides["rejected"][:-1] != context:
        raise DataError(f"{where}: 'chosen' and 'rejected' differ before their last turn")
    if row.get("prompt") is not None:
        prompt = row["prompt"]
        prompt_turns = (
            [{"role": "user", "content": prompt}]
            if isinstance(prompt, str)
            else _turn_list(prompt, "prompt", where)
        )
        context = prompt_turns + context
    if not any(t["role"] == "user" for t in context):
        raise DataError(f"{where}: no user turn before the replies")
    return context, sides["chosen"][-1]["content"], sides["rejected"][-1]["content"]


def build_preferences(
    rows: Sequence[dict[str, Any]],
    tokenizer: GemmaTokenizer,
    max_length: int,
    source: str,
    preamble: str | None = None,
    skip_malformed: bool = False,
    *,
    columns: Mapping[str, str] | None = None,
    read_skipped: int = 0,
) -> tuple[PreferenceRows, PreferenceStats]:
    """Tokenize preference rows; a malformed pair names its file and line unless skipped.

    `columns` renames columns of in-memory rows ({theirs: ours}; rows from `read_rows(...,
    columns=...)` are renamed already, so pass it in one place only). `read_skipped`: malformed
    lines `read_rows` skipped, counted in `rows` and `malformed_skipped`.
    """
    columns = check_columns(columns)
    stats = PreferenceStats(rows=len(rows) + read_skipped, malformed_skipped=read_skipped)
    sides: list[tuple[list[int], list[int], float, float]] = []
    pair_types: list[str] = []
    for index, row in enumerate(rows):
        where = row_location(rows, source, index)
        try:
            row = map_columns(row, columns, where)
            prompt, chosen, rejected = pair_sides(row, where)
            margin = float(row.get("margin") or 0.0)
            label = float(row["label"]) if row.get("label") is not None else 1.0
            if not 0.0 <= label <= 1.0:
                raise DataError(f"{where}: 'label' must be a probability in [0, 1], got {label}")
            # A missing or null row preamble (datasets fills absent columns with None) = the stage's.
            row_preamble = preamble if row.get("preamble") is None else row["preamble"]
            if row_preamble is not None and not isinstance(row_preamble, str):
                raise DataError(f"{where}: 'preamble' must be a string, got {row_preamble!r:.60}")
            pair_type = row.get("pair_type") or "pairs"
            if not isinstance(pair_type, str):
                raise DataError(f"{where}: 'pair_type' must be a string, got {pair_type!r:.60}")
            good = encode_for_reward(tokenizer, prompt, chosen, row_preamble or None)
            bad = encode_for_reward(tokenizer, prompt, rejected, row_preamble or None)
        except (DataError, TypeError, ValueError) as error:
            if not skip_malformed:
                if isinstance(error, DataError):
                    raise
                raise DataError(f"{where}: {error}") from error
            stats.malformed_skipped += 1
            continue
        if max(len(good), len(bad)) > max_length:
            # Truncating would cut away the scored token, so over-long pairs are dropped.
            stats.dropped_overlong += 1
            continue
        sides.append((good, bad, margin, label))
        pair_types.append(pair_type)
    if not sides:
        raise DataError(f"{source}: no usable preference pairs ({stats})")
    stats.pairs = len(sides)
    stats.pair_types = pair_types

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


def load_preferences(
    source: str,
    tokenizer: GemmaTokenizer,
    max_length: int,
    *,
    split: str = "train",
    preamble: str | None = None,
    skip_malformed: bool = False,
    columns: Mapping[str, str] | None = None,
) -> tuple[PreferenceRows, PreferenceStats]:
    """Read (renaming `columns`, skipping malformed lines if asked) and tokenize a source."""
    rows, skipped = read_rows(source, split, skip_malformed=skip_malformed, columns=columns)
    return build_preferences(
        rows, tokenizer, max_length, source, preamble, skip_malformed, read_skipped=skipped
    )
