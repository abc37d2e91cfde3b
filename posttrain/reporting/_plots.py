"""`metrics.png`: one panel per logged metric against step, drawn without a screen."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from posttrain.reporting._files import write_atomically
from posttrain.reporting._metrics_log import read_metrics

# Panels come in this order, then the stage's own metrics in the order they were first logged.
FIRST_PANELS = ("loss", "lr", "grad_norm", "tokens_per_second", "seconds")
LABELS = {
    "loss": "training loss",
    "lr": "learning rate",
    "grad_norm": "gradient norm",
    "tokens_per_second": "tokens / second",
    "seconds": "seconds / step",
}
# Below this many points the raw line is readable; above it, noise hides the trend.
SMOOTH_FROM_POINTS = 30
PANEL_COLUMNS = 3
UNSMOOTHED = frozenset({"lr"})


def _order(key: str, first_seen: int) -> tuple[int, int]:
    name = key.rsplit("/", 1)[-1]  # "train/loss" sorts as "loss"
    return (
        (FIRST_PANELS.index(name), 0) if name in FIRST_PANELS else (len(FIRST_PANELS), first_seen)
    )


def numeric_series(rows: list[dict], keys: Sequence[str] | None = None) -> dict[str, tuple]:
    """`{key: (steps, values)}` for each numeric metric in panel order. Without `keys`, a
    metric that never changes is left out (a flat line; its value is in the summary)."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(row["step"])
            values.append(float(value))
    if keys is not None:
        unknown = [k for k in keys if k not in series]
        if unknown:
            raise KeyError(f"no numeric values logged for {unknown}; logged: {sorted(series)}")
        return {k: series[k] for k in keys}
    firsts = {key: index for index, key in enumerate(series)}
    ordered = sorted(series, key=lambda k: _order(k, firsts[k]))
    return {
        k: series[k]
        for k in ordered
        if k.rsplit("/", 1)[-1] in FIRST_PANELS or len(set(series[k][1])) > 1
    }


def smooth(values: np.ndarray, span: int) -> np.ndarray:
    """Exponential moving average over about `span` points, debiased at the start (as
    TensorBoard's smoothing is) so the first points are not pulled towards zero."""
    decay = 1.0 - 2.0 / (span + 1)
    out = np.empty_like(values)
    average = weight = 0.0
    for index, value in enumerate(values):
        average = decay * average + (1 - decay) * value
        weight = decay * weight + (1 - decay)
        out[index] = average / weight
    return out


def plot_metrics(
    jsonl_path: str | Path,
    png_path: str | Path,
    keys: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Draw every numeric metric of a metrics.jsonl (or just `keys`) against step into a PNG."""
    # Figure without pyplot: no global backend, no display, safe beside other plotting code.
    from matplotlib.figure import Figure

    jsonl_path, png_path = Path(jsonl_path), Path(png_path)
    series = numeric_series(read_metrics(jsonl_path), keys)
    if not series:
        raise ValueError(f"{jsonl_path} holds no numeric metric to plot")
    columns = min(PANEL_COLUMNS, len(series))
    rows = math.ceil(len(series) / columns)
    figure = Figure(figsize=(5.0 * columns, 3.4 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (key, (steps, values)) in zip(axes, series.items(), strict=False):
        steps, values = np.asarray(steps), np.asarray(values)
        name = key.rsplit("/", 1)[-1]
        label = LABELS.get(name, key)
        # A schedule is exact, not noisy: smoothing it would only draw a lagging copy.
        if len(values) >= SMOOTH_FROM_POINTS and name not in UNSMOOTHED:
            span = max(5, len(values) // 20)
            ax.plot(steps, values, color="C0", alpha=0.3, linewidth=1, label="raw")
            ax.plot(steps, smooth(values, span), color="C0", linewidth=2, label=f"EMA ({span})")
            ax.legend(loc="best", fontsize="small")
        elif len(values) >= SMOOTH_FROM_POINTS:
            ax.plot(steps, values, color="C0", linewidth=1.5)
        else:
            ax.plot(steps, values, "o-", color="C0", markersize=4)
        # A loss falling by orders of magnitude is flat on a linear axis after the first
        # steps; a warmup learning rate starts near zero, so it stays linear.
        if name != "lr" and values.min() > 0 and values.max() / values.min() >= 100:
            ax.set_yscale("log")
            label += " (log scale)"
        ax.set_title(f"{label}: last {values[-1]:.4g}")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes[len(series) :]:
        ax.set_visible(False)
    # The run directory's last two parts name it (`sft/2026-05-01_10-00-00`, `pipeline/sft`).
    figure.suptitle(title or "/".join(jsonl_path.resolve().parent.parts[-2:]))
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100)
    return write_atomically(png_path, image.getvalue())


def plot_counts(
    groups: dict[str, dict[str, int | float]], png_path: str | Path, title: str | None = None
) -> Path:
    """Horizontal bar charts, one panel per group of counts: what a data stage generated
    (rows per file, pairs per type), where a stage has no steps to plot."""
    from matplotlib.figure import Figure

    groups = {name: counts for name, counts in groups.items() if counts}
    if not groups:
        raise ValueError("no counts to plot")
    figure = Figure(figsize=(5.0 * len(groups), 3.4), layout="constrained")
    axes = figure.subplots(1, len(groups), squeeze=False).ravel()
    for ax, (name, counts) in zip(axes, groups.items(), strict=True):
        labels, values = list(counts), [float(v) for v in counts.values()]
        bars = ax.barh(labels, values, color="C0")
        ax.bar_label(bars, labels=[f"{v:g}" for v in values], padding=3)
        ax.invert_yaxis()  # first key on top, as listed
        ax.set_title(name)
        ax.set_xlabel("count")
        ax.grid(alpha=0.3, axis="x")
    figure.suptitle(title or Path(png_path).resolve().parent.name)
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100)
    return write_atomically(Path(png_path), image.getvalue())
