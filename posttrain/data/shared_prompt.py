"""Preference pairs laid out with their shared prompt once: prefix, chosen rest, rejected rest.

Both sides of a pair repeat the same context (preamble, conversation, prompt), often most of
their tokens. Here each pair is one row: the longest common prefix of the two token sequences,
then the rest of the chosen side, then the rest of the rejected side. Branch ids keep the two
continuations from seeing each other, and each continuation's positions restart where the
prefix ends, so every token has exactly the context it has in its own sequence: the rewards
are the same function of the parameters, computed on fewer tokens.
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


def share_prompts(rows: PreferenceRows, multiple: int = 8) -> SharedPromptPairs:
    """Right-padded pairs -> shared-prefix rows, width rounded up to `multiple`."""
    chosen_lengths = rows.chosen_segments.sum(axis=1)
    rejected_lengths = rows.rejected_segments.sum(axis=1)
    prefixes = np.empty(len(chosen_lengths), np.int64)
    for i, (lc, lr) in enumerate(zip(chosen_lengths, rejected_lengths, strict=True)):
        shortest = min(lc, lr)
        differ = np.flatnonzero(rows.chosen[i, :shortest] != rows.rejected[i, :shortest])
        prefixes[i] = differ[0] if differ.size else shortest
    totals = chosen_lengths + rejected_lengths - prefixes
    width = int(-(-totals.max() // multiple) * multiple)
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
