"""The plot every RL run draws: reward against KL to the reference, with the Best-of-N curve.

Best-of-n of the reference policy is the yardstick of RL from a reward model: its expected
reward for n = 1..N comes from one pool of N reference samples per prompt (the unbiased
estimator of `posttrain.sampling.best_of_n.expected_best_of_n`), and its KL to the reference is
at most log n − (n−1)/n (exact without ties), so the curve is drawn at that KL.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.sampling.best_of_n import expected_best_of_n


def best_of_n_curve(pool_rewards: np.ndarray) -> dict[str, list[float]]:
    """{n, kl, reward}: E[best-of-n reward] over prompts for n = 1..N from pools [p, N], at KL
    log n − (n−1)/n."""
    pool_rewards = np.asarray(pool_rewards, np.float64)
    curve = expected_best_of_n(pool_rewards).mean(axis=0)
    n = np.arange(1, pool_rewards.shape[1] + 1, dtype=np.float64)
    return {
        "n": n.tolist(),
        "kl": (np.log(n) - (n - 1) / n).tolist(),
        "reward": curve.tolist(),
    }


def plot_reward_vs_kl(
    rows: Sequence[dict[str, Any]],
    png_path: str | Path,
    curve: dict[str, list[float]] | None = None,
    reward_key: str = "reward",
    kl_key: str = "kl_k1",
    title: str | None = None,
) -> Path:
    """Draw the run's (KL, reward) per step, coloured by step, over the Best-of-N curve."""
    from matplotlib.figure import Figure

    points = [
        (r[kl_key], r[reward_key], r["step"]) for r in rows if kl_key in r and reward_key in r
    ]
    if not points:
        raise ValueError(f"no step logged both {kl_key!r} and {reward_key!r}")
    kl, reward, step = (np.asarray(v, np.float64) for v in zip(*points, strict=True))
    figure = Figure(figsize=(6.4, 4.8), dpi=100)
    axes = figure.add_subplot()
    if curve is not None:
        axes.plot(
            curve["kl"], curve["reward"], "k--", marker="o", ms=3, label="best-of-n (reference)"
        )
        for n, x, y in zip(curve["n"], curve["kl"], curve["reward"], strict=True):
            if int(n) in (1, 2, 4, 8, 16, 32, 64):
                axes.annotate(f"n={int(n)}", (x, y), textcoords="offset points", xytext=(4, -10))
    scatter = axes.scatter(kl, reward, c=step, cmap="viridis", s=12, label="policy (per step)")
    figure.colorbar(scatter, ax=axes, label="step")
    axes.set_xlabel("KL(policy ‖ reference), nats per sequence (k1)")
    axes.set_ylabel("reward")
    axes.set_title(title or "reward vs KL")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    path = Path(png_path)
    tmp = path.with_suffix(".tmp.png")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)  # the plot appears whole or not at all
    return path


def save_curve(path: str | Path, curve: dict[str, list[float]]) -> None:
    """Write the Best-of-N curve as JSON (a resumed run reuses it)."""
    Path(path).write_text(json.dumps(curve, indent=1))


def load_curve(path: str | Path) -> dict[str, list[float]] | None:
    """The saved Best-of-N curve, or None."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None
