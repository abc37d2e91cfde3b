"""The trainer as RL needs it: frozen trees as arguments, extras in the state, on-policy sources,
exact resume after SIGKILL, and non-finite steps that change nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from posttrain.train.step import ema_update, init_state, make_train_step

WORKER = Path(__file__).with_name("trainer_worker.py")


def _run_worker(directory: Path, steps: int, output: Path, slow: bool = False):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    args = [sys.executable, str(WORKER), str(directory), str(steps), str(output)]
    return subprocess.Popen(
        [*args, *(["--slow"] if slow else [])],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_frozen_tree_ema_extras_and_on_policy_source_resume_bitwise_after_sigkill(tmp_path):
    # Given an uninterrupted 12-step on-policy run with a frozen reference and an EMA anchor,
    straight = _run_worker(tmp_path / "a", 12, tmp_path / "a.npz")
    # when the same run is SIGKILLed after its 5th step's checkpoint and then run again,
    killed = _run_worker(tmp_path / "b", 12, tmp_path / "b.npz", slow=True)
    for line in killed.stdout:
        if line.startswith("step 5"):
            break
    deadline = time.time() + 30
    while not (tmp_path / "b" / "5").exists() and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert straight.wait(timeout=120) == 0, straight.stdout.read()
    resumed = _run_worker(tmp_path / "b", 12, tmp_path / "b.npz")
    out = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 0, out
    # then it resumed from a checkpoint before the end, and every leaf of the state (params,
    # Adam moments, step, RNG, EMA anchor, baseline) and the source's draw counter are bitwise
    # those of the uninterrupted run.
    assert "step 6" in out and "step 1\n" not in out
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 6
    for name in a.files:
        assert a[name].tobytes() == b[name].tobytes(), name
    assert int(a["draws"]) == 12


def test_frozen_trees_are_arguments_not_constants():
    # A frozen tree changed between calls changes the loss without recompiling the step.
    optimizer = optax.sgd(0.1)

    def loss_terms(params, batch, frozen):
        return jnp.sum((params["w"] - frozen["target"]) ** 2 * batch), jnp.float32(batch.size)

    step = make_train_step(loss_terms, optimizer, uses_frozen=True)
    batch = jnp.ones((2,))
    _, first = step(init_state({"w": jnp.zeros(())}, optimizer, 0), batch, {"target": 1.0})
    _, second = step(init_state({"w": jnp.zeros(())}, optimizer, 0), batch, {"target": 3.0})
    assert float(first["loss"]) == pytest.approx(1.0) and float(second["loss"]) == pytest.approx(
        9.0
    )
    assert step._cache_size() == 1


def test_extras_update_after_the_optimizer_step_with_aux_means():
    optimizer = optax.sgd(0.5)

    def loss_terms(params, batch, extras):
        loss = jnp.sum((params["w"] - batch) ** 2)
        return loss, jnp.float32(batch.size), {"seen": jnp.sum(batch) + 0 * extras["count"]}

    def update_extras(extras, params, aux, frozen):
        return {
            "anchor": ema_update(extras["anchor"], params, 0.25),
            "count": extras["count"] + 1,
            "last_seen": aux["seen"],
        }

    step = make_train_step(loss_terms, optimizer, 2, uses_extras=True, update_extras=update_extras)
    extras = {"anchor": {"w": jnp.zeros(())}, "count": jnp.zeros((), jnp.int32), "last_seen": 0.0}
    state = init_state({"w": jnp.zeros(())}, optimizer, 0, extras)
    state, metrics = step(state, jnp.array([1.0, 2.0, 3.0, 4.0]))
    # mean loss gradient: 2·(0 - 2.5) = -5; w = 0 + 0.5·5 = 2.5; anchor = 0.25·2.5.
    assert float(state.params["w"]) == pytest.approx(2.5)
    assert float(state.extras["anchor"]["w"]) == pytest.approx(0.625)
    assert int(state.extras["count"]) == 1
    # aux sums over both micro-batches, divided by the global count of 4: 10 / 4.
    assert float(metrics["seen"]) == pytest.approx(2.5)
    assert float(state.extras["last_seen"]) == pytest.approx(2.5)


def test_finite_loss_with_non_finite_gradient_leaves_the_state_bitwise_unchanged():
    # sqrt's gradient at 0 is infinite while the loss, 0, is finite.
    optimizer = optax.adamw(0.1)

    def loss_terms(params, batch):
        return jnp.sum(jnp.sqrt(params["w"] * batch)), jnp.float32(batch.size)

    step = make_train_step(loss_terms, optimizer, uses_extras=False)
    state = init_state({"w": jnp.ones(3)}, optimizer, 0, {"anchor": jnp.arange(3.0)})
    state, _ = step(state, jnp.ones(3))  # one good step: Adam's moments are non-zero
    before = [np.asarray(x).copy() for x in jax.tree.leaves(state)]
    assert any(np.abs(x).sum() > 0 for x in jax.tree.leaves(state.opt_state))
    after, metrics = step(state, jnp.zeros(3))
    assert np.isfinite(float(metrics["loss"])) and not bool(metrics["finite"])
    for old, new in zip(before, jax.tree.leaves(after), strict=True):
        assert old.tobytes() == np.asarray(new).tobytes()
