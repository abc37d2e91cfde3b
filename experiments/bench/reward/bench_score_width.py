"""Seconds to score preference pairs for metrics: rows cut after each call's longest one
(`posttrain.stages.reward._trimmed`) against rows at the split's full `max_length`.

The language-fix recipe's shapes: a tiny Gemma 2 reward model (vocabulary 1000), 2000 pairs in
calls of 128, rows padded to 128 with 40-83 real tokens (the preamble, prompt and reply). The two
sides are interleaved in one process, 3 rounds, after one warm-up each.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from experiments.bench.common import cpu_name, median_seconds, package_versions, prepend_results
from posttrain.data.preferences import PreferenceRows
from posttrain.models import get_preset, init_params
from posttrain.rewards.reward_model import init_head
from posttrain.stages import reward

RESULTS = Path(__file__).with_name("SCORE_WIDTH_RESULTS.md")
PAIRS, CALL, WIDTH, SHORTEST, LONGEST, VOCAB = 2000, 128, 128, 40, 83, 1000


def _rows(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    tokens = rng.integers(3, VOCAB, (PAIRS, WIDTH), dtype=np.int32)
    lengths = rng.integers(SHORTEST, LONGEST + 1, PAIRS)
    segments = (np.arange(WIDTH)[None, :] < lengths[:, None]).astype(np.int32)
    return tokens * segments, segments


def main() -> None:
    """Time both sides, check they score alike, and prepend a section to the results file."""
    config = get_preset("tiny_gemma2", vocab_size=VOCAB)
    params = {"backbone": init_params(config, jax.random.key(0)), "head": init_head(config)}
    params["head"]["w"] = params["head"]["w"] + 0.01
    rng = np.random.default_rng(0)
    chosen, rejected = _rows(rng), _rows(rng)
    rows = PreferenceRows(*chosen, *rejected, np.zeros(PAIRS), np.ones(PAIRS))
    trim = reward._trimmed

    def scored(trimmed: bool) -> tuple[np.ndarray, np.ndarray]:
        reward._trimmed = trim if trimmed else (lambda tokens, segments: (tokens, segments))
        try:
            return reward.score_pairs(config, params, rows, CALL)
        finally:
            reward._trimmed = trim

    gap = float(np.max(np.abs(scored(True)[0] - scored(False)[0])))
    rounds = [
        (median_seconds(lambda: scored(True), 1), median_seconds(lambda: scored(False), 1))
        for _ in range(3)
    ]
    trimmed = statistics.median(r[0] for r in rounds)
    full = statistics.median(r[1] for r in rounds)
    header = "# Metric scoring seconds: rows trimmed per call against full max_length\n\n"
    section = (
        f"## {datetime.date.today()} — CPU, float32, tiny_gemma2 (vocabulary {VOCAB}), "
        f"{PAIRS} pairs in calls of {CALL}, rows {WIDTH} wide with {SHORTEST}-{LONGEST} tokens\n\n"
        f"- machine: {cpu_name()}, Python {platform.python_version()}\n"
        f"- versions: {package_versions(('jax', 'jaxlib', 'flax'))}\n"
        "- seconds to score both sides of every pair; the two sides interleaved in one process, "
        "3 rounds after a warm-up each, median\n"
        "- command: `.venv/bin/python experiments/bench/reward/bench_score_width.py`\n\n"
        "| rows | s |\n|---|---|\n"
        f"| trimmed (`_trimmed`) | {trimmed:.2f} |\n| full width | {full:.2f} |\n\n"
        f"Full / trimmed: **{full / trimmed:.2f}x** (rounds: "
        + ", ".join(f"{t:.2f} / {f:.2f}" for t, f in rounds)
        + f" s). Largest score difference between the sides: {gap:.1e}.\n"
    )
    prepend_results(RESULTS, header, section)
    print(section)


if __name__ == "__main__":
    main()
