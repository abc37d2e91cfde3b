"""Preference pairs laid out with their shared prompt once: prefix, chosen rest, rejected rest.

Both sides of a pair repeat the same context (preamble, conversation, prompt), often most of
their tokens. In `share_prompts` each pair is one row: the longest common prefix of the two
token sequences, then the rest of the chosen side, then the rest of the rejected side. Branch
ids keep the two continuations from seeing each other, and each continuation's positions
restart where the prefix ends, so every token has exactly the context it has in its own
sequence: the rewards are the same function of the parameters, computed on fewer tokens.

A recurrence cannot restart a branch within a row, so `fork_prompts` lays a pair out as three
blocks instead: the prefix, left-padded so that its state is the one after the last column, and
the two rests, right-padded, each continuing that state (`backbone.forked_hidden`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from posttrain.data.preferences import PreferenceRows
from posttrain.tokenizer import PAD_ID

PREFIX, CHOSEN, REJECTED = 0, 1, 2


class SharedPromptPairs(NamedTuple):
    """One row per pair [n, L]; `last` [n, 2] indexes each side's final token (chosen, rejected)."""

    tokens: np.ndarray
    segments: np.ndarray  # 1 on tokens, 0 on padding
    positions: np.ndarray
    branches: np.ndarray  # PREFIX, CHOSEN or REJECTED
    last: np.ndarray
    margin: np.ndarray
    label: np.ndarray


class ForkedPairs(NamedTuple):
    """A pair's prefix once [n, x] and both rests [n, 2, t] (chosen, rejected) continuing it;
    `last` [n, 2] indexes each rest's final token."""

    prompt: np.ndarray  # left-padded: every prefix ends in the last column
    prompt_segments: np.ndarray  # 1 on tokens, 0 on padding
    tokens: np.ndarray  # right-padded
    segments: np.ndarray
    positions: np.ndarray  # continuing the prefix's
    last: np.ndarray
    margin: np.ndarray
    label: np.ndarray


def _lengths_and_prefixes(rows: PreferenceRows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each side's token count and the length of the two sides' common prefix [n]."""
    chosen_lengths = rows.chosen_segments.sum(axis=1)
    rejected_lengths = rows.rejected_segments.sum(axis=1)
    prefixes = np.empty(len(chosen_lengths), np.int64)
    for i, (lc, lr) in enumerate(zip(chosen_lengths, rejected_lengths, strict=True)):
        shortest = min(lc, lr)
        differ = np.flatnonzero(rows.chosen[i, :shortest] != rows.rejected[i, :shortest])
        prefixes[i] = differ[0] if differ.size else shortest
    return chosen_lengths, rejected_lengths, prefixes


def _round_up(length: int, multiple: int) -> int:
    return int(-(-length // multiple) * multiple)


def share_prompts(rows: PreferenceRows, multiple: int = 8) -> SharedPromptPairs:
    """Right-padded pairs -> shared-prefix rows, width rounded up to `multiple`."""
    chosen_lengths, rejected_lengths, prefixes = _lengths_and_prefixes(rows)
    totals = chosen_lengths + rejected_lengths - prefixes
    width = _round_up(totals.max(), multiple)
    n = len(totals)
    tokens = np.full((n, width), PAD_ID, np.int32)
    segments = np.zeros((n, width), np.int32)
    positions = np.zeros((n, width), np.int32)
    branches = np.zeros((n, width), np.int32)
    last = np.empty((n, 2), np.int32)
    for i, (p, lc, lr) in enumerate(zip(prefixes, chosen_lengths, rejected_lengths, strict=True)):
        rest = lr - p
        tokens[i, :lc] = rows.chosen[i, :lc]
        tokens[i, lc : lc + rest] = rows.rejected[i, p:lr]
        segments[i, : lc + rest] = 1
        positions[i, :lc] = np.arange(lc)
        positions[i, lc : lc + rest] = np.arange(p, lr)
        branches[i, p:lc] = CHOSEN
        branches[i, lc : lc + rest] = REJECTED
        # A side that is all prefix ends inside it.
        last[i] = (lc - 1, lc + rest - 1 if rest else p - 1)
    return SharedPromptPairs(tokens, segments, positions, branches, last, rows.margin, rows.label)


def fork_prompts(rows: PreferenceRows, multiple: int = 8) -> ForkedPairs:
    """Right-padded pairs -> a prefix block and two continuation blocks, widths rounded up to
    `multiple`."""
    chosen_lengths, rejected_lengths, prefixes = _lengths_and_prefixes(rows)
    # Each side keeps at least its last token, the scored one, in its own block: its hidden
    # state then always comes from the branch's pass.
    shortest = np.minimum(chosen_lengths, rejected_lengths)
    prefixes = np.clip(np.minimum(prefixes, shortest - 1), 0, None)
    n = len(prefixes)
    x = _round_up(max(int(prefixes.max()), 1), multiple)  # a block of width 0 has no pass
    t = _round_up(int((np.maximum(chosen_lengths, rejected_lengths) - prefixes).max()), multiple)
    prompt = np.full((n, x), PAD_ID, np.int32)
    prompt_segments = np.zeros((n, x), np.int32)
    tokens = np.full((n, 2, t), PAD_ID, np.int32)
    segments = np.zeros((n, 2, t), np.int32)
    positions = np.zeros((n, 2, t), np.int32)
    last = np.empty((n, 2), np.int32)
    for i, p in enumerate(prefixes):
        prompt[i, x - p :], prompt_segments[i, x - p :] = rows.chosen[i, :p], 1
        for j, (side, length) in enumerate(
            ((rows.chosen, chosen_lengths[i]), (rows.rejected, rejected_lengths[i]))
        ):
            rest = length - p
            tokens[i, j, :rest], segments[i, j, :rest] = side[i, p:length], 1
            positions[i, j] = p + np.arange(t)
            last[i, j] = rest - 1
    return ForkedPairs(
        prompt, prompt_segments, tokens, segments, positions, last, rows.margin, rows.label
    )


# The layout of each `backbone.prompt_sharing` mode.
PAIR_LAYOUTS = {"branches": share_prompts, "fork": fork_prompts}
