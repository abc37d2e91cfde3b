"""The training loop: resume, step, log, checkpoint; SIGTERM/SIGINT save and exit cleanly.

Resume order: 1. the newest finished checkpoint in the run's checkpoint directory, with its
data position; 2. otherwise the given initial state. A non-finite loss stops the run with an
error naming the step (the state is left unchanged by the step, and nothing is saved over the
last good checkpoint), or skips the batch when `skip_nonfinite` is set.

Batches come from a source with a JSON-serialisable position (`state()` / `restore(position)`,
saved in every checkpoint). An offline source yields batches with `next(source)`; an on-policy
source (rollouts) builds each batch from the current train state with `source.next_batch(state)`,
and keeps its prompt order and sampler RNG in its position, so a resumed run draws the same
rollouts it would have drawn.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax

from posttrain.train.checkpointing import Checkpointer
from posttrain.train.step import TrainState


class NonFiniteLossError(FloatingPointError):
    """A step produced a NaN or infinite loss or gradient."""


class BatchSource(Protocol):
    """A resumable source of batches: `next(source)` or `source.next_batch(state)`."""

    def state(self) -> dict[str, Any]: ...

    def restore(self, position: dict[str, Any]) -> None: ...


@runtime_checkable
class OnPolicySource(Protocol):
    """A source whose batches depend on the current train state (rollouts of the policy)."""

    def next_batch(self, state: TrainState) -> Any: ...

    def state(self) -> dict[str, Any]: ...

    def restore(self, position: dict[str, Any]) -> None: ...


@dataclasses.dataclass
class LoopResult:
    """How the loop ended."""

    state: TrainState
    steps_run: int
    skipped_nonfinite: int
    interrupted: bool  # stopped by SIGTERM/SIGINT after saving
    resumed_from: int | None

    def summary(self) -> dict[str, Any]:
        """How the loop ended, as every training stage reports it."""
        return dict(
            steps=int(self.state.step),
            steps_run=self.steps_run,
            interrupted=self.interrupted,
            resumed_from=self.resumed_from,
            skipped_nonfinite=self.skipped_nonfinite,
        )


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


def next_batch(source: Any, state: TrainState) -> Any:
    """The next batch of an offline or an on-policy source."""
    if isinstance(source, OnPolicySource):
        return source.next_batch(state)
    return next(source)


def run_training(
    state: TrainState,
    step_fn: Callable[[TrainState, Any], tuple[TrainState, dict]],
    batches: BatchSource,
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
            state, metrics = step_fn(state, next_batch(batches, state))
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not metrics["finite"]:
                if not skip_nonfinite:
                    checkpointer.wait()
                    raise NonFiniteLossError(
                        f"non-finite loss or gradient at step {int(state.step)} "
                        f"(loss={metrics['loss']}, grad_norm={metrics['grad_norm']}); the state "
                        f"was not updated and the last checkpoint (step "
                        f"{checkpointer.latest_step()}) is intact"
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
