"""What every RL stage adds to a step's metrics, and what it keeps for its summary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class RLStepLog:
    """The `on_step` of an RL stage: the time split, a table of samples now and then, and the
    first and last values of the headline metrics (`initial_<key>`, `final_<key>`)."""

    def __init__(self, ctx: Any, source: Any, sample_every: int, keys: Sequence[str]) -> None:
        self.ctx, self.source, self.sample_every, self.keys = ctx, source, sample_every, keys
        self.history: dict[str, float] = {}

    def __call__(self, step: int, metrics: dict[str, float], state: Any) -> None:
        """Add the time split to `metrics`, remember the headline values, log a sample table."""
        seconds = self.source.seconds
        metrics.update({f"seconds_{part}": value for part, value in seconds.items()})
        # The loop times rollouts and the optimizer step together; the rest is the update.
        metrics["seconds_update"] = metrics["seconds"] - sum(seconds.values())
        for key in self.keys:
            self.history.setdefault(f"initial_{key}", metrics[key])
            self.history[f"final_{key}"] = metrics[key]
        if self.sample_every and step % self.sample_every == 0:
            rows = [
                [str(prompt), response, float(reward)]
                for prompt, response, reward in zip(
                    self.source.last_prompts[:8],
                    self.source.last_responses[:8],
                    np.asarray(self.source.last_rewards)[:8],
                    strict=False,
                )
            ]
            self.ctx.tracker.log_table(
                "train/samples", ["prompt", "response", "reward"], rows, step
            )
