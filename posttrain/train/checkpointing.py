"""Orbax checkpoints of the train state and the data position: atomic, async, last k kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from posttrain.train.step import TrainState


class Checkpointer:
    """Saves {state, data} at steps; Orbax writes to a temporary directory and renames it, so a
    crash mid-save never corrupts the latest finished checkpoint."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True) -> None:
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(self, state: TrainState, data_state: dict[str, Any], force: bool = False) -> None:
        """Save at `state.step` (in the background when async)."""
        step = int(state.step)
        if self.manager.latest_step() == step:
            return
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        )
        self.manager.save(step, args=args, force=force)

    def restore(self, like: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """Restore into the structure, shapes, dtypes and shardings of `like`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            ),
        )
        return TrainState(*restored["state"]), dict(restored["data"])

    def wait(self) -> None:
        """Block until background saves have finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()
