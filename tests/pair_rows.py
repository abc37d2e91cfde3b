"""Preference rows from token lists, for the shared-prompt layout tests of both families."""

from __future__ import annotations

import numpy as np

from posttrain.data.preferences import PreferenceRows


def pair_rows(
    sides: list[tuple[list[int], list[int]]], width: int, margins: np.ndarray | None = None
) -> PreferenceRows:
    """(chosen, rejected) token lists -> right-padded rows of `width`, label 1 (margins 0)."""

    def pad(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.zeros((len(seqs), width), np.int32)
        segments = np.zeros((len(seqs), width), np.int32)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)], segments[i, : len(s)] = s, 1
        return tokens, segments

    n = len(sides)
    return PreferenceRows(
        *pad([c for c, _ in sides]),
        *pad([r for _, r in sides]),
        np.zeros(n, np.float32) if margins is None else np.asarray(margins, np.float32),
        np.ones(n, np.float32),
    )
