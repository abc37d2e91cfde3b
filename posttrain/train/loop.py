"""The training loop: resume, step, log, checkpoint; SIGTERM/SIGINT save and exit cleanly.

Resume order: 1. the newest finished checkpoint in the run's checkpoint directory, with its
data position; 2. otherwise the given initial state. A non-finite loss stops the run with an
error naming the step (the state is left unchanged by the step, and nothing is saved over the
last good checkpoint), or skips the batch when `skip_nonfinite` is set.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax

from posttrain.train.checkpointing import Checkpointer
from posttrain.train.step import TrainState


class NonFiniteLossError(FloatingPointError):
    """A step produced a NaN or infinite loss or gradient."""


@dataclasses.dataclass
class LoopResult:
    """How the loop ended."""

    state: TrainState
    steps_run: int
    skipped_nonfinite: int
    interrupted: bool  # stopped by SIGTERM/SIGINT after saving
    resumed_from: int | None


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_training(
    state: TrainState,
    step_fn: Callable[[TrainState, Any], tuple[TrainState, dict]],
    batches: Iterator[Any],
    checkpointer: Checkpointer,
    total_steps: int,
    save_every: int,
    on_metrics: Callable[[int, dict[str, float], TrainState], None] | None = None,
    skip_nonfinite: bool = False,
) -> LoopResult:
    """Train until `total_steps` optimizer steps (counting resumed ones)."""
    resumed_from = checkpointer.latest_step()
    if resumed_from is not None:
        state, data_state = checkpointer.restore(state)
        batches.restore(data_state)
    steps_run = skipped = 0
    interrupted = False
    with _StopRequest() as stop:
        while int(state.step) < total_steps:
            started = time.perf_counter()
            state, metrics = step_fn(state, next(batches))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not metrics["finite"]:
                if not skip_nonfinite:
                    checkpointer.wait()
                    raise NonFiniteLossError(
                        f"non-finite loss or gradient at step {int(state.step)} "
                        f"(loss={metrics['loss']}); the state was not updated and the last "
                        f"checkpoint (step {checkpointer.latest_step()}) is intact"
                    )
                skipped += 1
            steps_run += 1
            metrics["seconds"] = time.perf_counter() - started
            metrics["skipped_nonfinite"] = skipped
            if on_metrics is not None:
                on_metrics(int(state.step), metrics, state)
            step = int(state.step)
            if stop.requested:
                interrupted = True
                break
            if save_every and step % save_every == 0 and step < total_steps:
                checkpointer.save(state, batches.state())
    checkpointer.save(state, batches.state(), force=True)
    checkpointer.wait()
    return LoopResult(state, steps_run, skipped, interrupted, resumed_from)
