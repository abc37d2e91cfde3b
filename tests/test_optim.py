"""Schedules and optimizers from OptimConfig."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from posttrain.train.optim import OptimConfig, make_optimizer, make_schedule


def test_warmup_then_cosine_to_the_final_fraction():
    config = OptimConfig(lr=1e-3, warmup_steps=10, total_steps=110, final_lr_fraction=0.1)
    schedule = make_schedule(config)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(60)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-5)  # cosine midpoint
    assert float(schedule(110)) == pytest.approx(1e-4)


def test_linear_decay():
    schedule = make_schedule(OptimConfig(lr=2.0, schedule="linear", total_steps=4))
    np.testing.assert_allclose([float(schedule(s)) for s in range(5)], [2.0, 1.5, 1.0, 0.5, 0.0])


def test_clipping_bounds_the_update():
    config = OptimConfig(name="adamw", lr=1.0, clip_norm=1e-3, schedule="constant")
    optimizer = make_optimizer(config)
    params = {"w": jnp.zeros(3)}
    state = optimizer.init(params)
    clipped = optax.clip_by_global_norm(1e-3)
    grads = {"w": jnp.asarray([300.0, -400.0, 0.0])}
    direction, _ = clipped.update(grads, clipped.init(params))
    assert float(optax.global_norm(direction)) == pytest.approx(1e-3)
    updates, _ = optimizer.update(grads, state, params)
    assert np.all(np.isfinite(updates["w"]))


def test_adafactor_builds_and_steps():
    optimizer = make_optimizer(OptimConfig(name="adafactor", lr=1e-2))
    params = {"w": jnp.ones((4, 4))}
    updates, _ = optimizer.update({"w": jnp.ones((4, 4))}, optimizer.init(params), params)
    assert updates["w"].shape == (4, 4) and float(jnp.abs(updates["w"]).sum()) > 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(name="sgd"), "optim.name"),
        (dict(schedule="step"), "optim.schedule"),
        (dict(lr=0.0), "optim.lr"),
        (dict(warmup_steps=5, total_steps=2), "warmup_steps"),
    ],
)
def test_bad_values_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        OptimConfig(**fields)
