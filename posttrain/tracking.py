"""Experiment tracking with wandb: offline by default, online or disabled by config.

Only process 0 talks to wandb. A run keeps one wandb run across restarts: the first start
writes the run id to `<run_dir>/wandb_run_id`, and every later start in that directory passes
it back with `resume="allow"`.

- Online, wandb continues the run. It holds the steps logged before the restart, and the
  training steps between the last checkpoint and the kill are repeated (bitwise-exactly on
  CPU), so `log` skips steps below the run's `starting_step` instead of letting wandb warn
  about each one.
- Offline (wandb 0.31 has no server to resume from, so `run.resumed` stays False), every start
  writes a new `<run_dir>/wandb/offline-run-<time>-<id>[-N]` directory with the same run id.
  `wandb sync <run_dir>/wandb/offline-run-*` uploads the directories of one run id one after
  another, in order of start time, into that one run (`wandb sync --help`, "resumed
  fragments"), so they land as one run, not one per restart.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import jax

MODES = ("offline", "online", "disabled")
RUN_ID_FILE = "wandb_run_id"


class Tracker:
    """A thin wrapper so stages log dicts, tables and images without caring about the mode."""

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
        self.run_dir = Path(run_dir)
        self.resumed = False  # whether this start continues a wandb run started here before
        self._first_new_step = 0
        if mode == "disabled" or jax.process_index() != 0:
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        id_file = self.run_dir / RUN_ID_FILE
        self.resumed = id_file.exists()
        run_id = id_file.read_text().strip() if self.resumed else secrets.token_hex(6)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            mode=mode,
            dir=str(self.run_dir),
            config=config,
            group=group,
            name=name,
            id=run_id,
            resume="allow",
            settings=wandb.Settings(console="off"),
        )
        # Written once the run exists, so a start that failed in init leaves no dangling id.
        if not self.resumed and not self.run.disabled:
            id_file.write_text(self.run.id + "\n")
        self._first_new_step = int(self.run.starting_step or 0)

    @property
    def run_id(self) -> str | None:
        """The wandb run id (None when disabled or not process 0)."""
        return None if self.run is None else self.run.id

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log scalars at a step."""
        # A resumed online run already holds the steps before `starting_step`.
        if self.run is not None and step >= self._first_new_step:
            self.run.log(metrics, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """Log a table (e.g. sampled answers)."""
        if self.run is not None and step >= self._first_new_step:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def log_image(self, key: str, png_path: str | Path, step: int) -> None:
        """Log an image file (e.g. the metrics.png of `posttrain.reporting.plot_metrics`)."""
        if self.run is None:
            return
        if not Path(png_path).is_file():
            raise FileNotFoundError(f"log_image({key!r}): no image at {png_path}")
        import wandb

        # An image is logged once, at the end: never drop it, whatever step it names.
        self.run.log({key: wandb.Image(str(png_path))}, step=max(step, self._first_new_step))

    def finish(self) -> None:
        """Flush and close the run."""
        if self.run is not None:
            self.run.finish()
