"""Experiment tracking with wandb: offline by default, online or disabled by config.

Only process 0 talks to wandb. Offline runs land in the run directory and can be pushed later
with `wandb sync <run_dir>/wandb/offline-run-*`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax

MODES = ("offline", "online", "disabled")


class Tracker:
    """A thin wrapper so stages log dicts and tables without caring about the mode."""

    def __init__(
        self,
        mode: str,
        project: str,
        run_dir: str | Path,
        config: dict[str, Any],
        group: str | None = None,
        name: str | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"logger.mode={mode!r}; expected one of {MODES}")
        self.run = None
        if mode == "disabled" or jax.process_index() != 0:
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=project,
            mode=mode,
            dir=str(run_dir),
            config=config,
            group=group,
            name=name,
            settings=wandb.Settings(console="off"),
        )

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log scalars at a step."""
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """Log a table (e.g. sampled answers)."""
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def finish(self) -> None:
        """Flush and close the run."""
        if self.run is not None:
            self.run.finish()
