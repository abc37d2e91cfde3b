"""Schedules and optimizers from OptimConfig."""

import math

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


def adafactor_updates(**fields) -> np.ndarray:
    """Three Adafactor steps on a 4x4 weight of scale 3 with growing gradients; the last update."""
    config = OptimConfig(name="adafactor", lr=0.1, schedule="constant", clip_norm=None, **fields)
    optimizer = make_optimizer(config)
    params = {"w": 3.0 * jnp.ones((4, 4))}  # RMS 3: multiply_by_parameter_scale triples the step
    state = optimizer.init(params)
    rng = np.random.default_rng(0)
    for scale in (
        0.1,
        1.0,
        10.0,
    ):  # growing gradients push the update's RMS above 1: clipping bites
        grads = {"w": jnp.asarray(scale * rng.normal(size=(4, 4)), jnp.float32)}
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(updates["w"])


@pytest.mark.parametrize(
    "change",
    [
        dict(decay_rate=0.5),
        dict(momentum=0.9),
        dict(eps=1.0),
        dict(clipping_threshold=math.inf),
        dict(multiply_by_parameter_scale=False),
    ],
    ids=lambda change: next(iter(change)),
)
def test_each_adafactor_setting_changes_the_update(change):
    baseline = adafactor_updates()
    changed = adafactor_updates(**change)
    assert np.abs(changed - baseline).max() > 1e-2 * np.abs(baseline).max()


def test_adafactor_defaults_are_optax_defaults():
    config = OptimConfig(name="adafactor", lr=0.1, schedule="constant", clip_norm=None)
    assert (config.b1, config.b2, config.eps, config.decay_rate) == (None, None, 1e-30, 0.8)
    reference = optax.adafactor(0.1)
    params = {"w": 3.0 * jnp.ones((4, 4))}
    grads = {"w": jnp.arange(16.0).reshape(4, 4)}
    ours, _ = make_optimizer(config).update(grads, make_optimizer(config).init(params), params)
    theirs, _ = reference.update(grads, reference.init(params), params)
    np.testing.assert_array_equal(ours["w"], theirs["w"])


def test_adamw_fills_its_defaults():
    config = OptimConfig()
    assert (config.b1, config.b2, config.eps) == (0.9, 0.999, 1e-8)
    assert config.decay_rate is None and config.multiply_by_parameter_scale is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(name="adafactor", b1=0.9), r"optim\.b1 is not a setting of optim\.name=adafactor"),
        (dict(name="adafactor", b2=0.99), r"optim\.b2 .*optim\.decay_rate"),
        (dict(name="adamw", decay_rate=0.8), r"optim\.decay_rate .*optim\.b2"),
        (dict(name="adamw", momentum=0.9), r"optim\.momentum .*optim\.b1"),
        (dict(name="adamw", multiply_by_parameter_scale=True), "optim.multiply_by_parameter_scale"),
    ],
)
def test_a_key_the_optimizer_lacks_is_rejected_by_name(fields, message):
    with pytest.raises(ValueError, match=message):
        OptimConfig(**fields)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(name="sgd"), "optim.name"),
        (dict(schedule="step"), "optim.schedule"),
        (dict(lr=0.0), "optim.lr"),
        (
            dict(warmup_steps=5, total_steps=2),
            r"warmup_steps must be in \[0, optim.total_steps=2\]",
        ),
        (dict(total_steps=0), r"optim.total_steps must be >= 1 \(it follows stage.steps\)"),
        (dict(b2=1.0), "optim.b2"),
        (dict(name="adafactor", decay_rate=0.0), "optim.decay_rate"),
    ],
)
def test_bad_values_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        OptimConfig(**fields)
