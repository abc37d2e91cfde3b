"""The Bradley-Terry loss recovers a known linear reward; its invariances hold exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from posttrain.losses.bradley_terry import bradley_terry_loss, preference_metrics


def _linear_task(seed=0, pairs=20_000, dim=8):
    """algorithms.md §2.4.1: r* = w*·x + 3, labels drawn from BT."""
    rng = np.random.default_rng(seed)
    true_w = rng.normal(size=dim)
    a, b = rng.normal(size=(pairs, dim)), rng.normal(size=(pairs, dim))
    p_a = 1 / (1 + np.exp(-((a - b) @ true_w)))
    a_wins = rng.random(pairs) < p_a
    chosen = np.where(a_wins[:, None], a, b)
    rejected = np.where(a_wins[:, None], b, a)
    bayes = np.mean(np.maximum(p_a, 1 - p_a))
    return true_w, jnp.asarray(chosen, jnp.float32), jnp.asarray(rejected, jnp.float32), bayes


def _fit(chosen, rejected, center=0.0, steps=800):
    params = {"w": jnp.zeros(chosen.shape[1]), "b": jnp.zeros(())}
    optimizer = optax.adam(0.05)

    def loss_fn(p):
        r_plus, r_minus = chosen @ p["w"] + p["b"], rejected @ p["w"] + p["b"]
        return jnp.mean(bradley_terry_loss(r_plus, r_minus, center_coefficient=center))

    @jax.jit
    def step(p, state):
        grads = jax.grad(loss_fn)(p)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state

    state = optimizer.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params


def test_recovers_a_known_linear_reward():
    true_w, chosen, rejected, bayes = _linear_task()
    fitted = _fit(chosen, rejected)
    w = np.asarray(fitted["w"])
    cosine = w @ true_w / np.linalg.norm(w) / np.linalg.norm(true_w)
    assert cosine >= 0.999
    assert 0.95 <= np.linalg.norm(w) / np.linalg.norm(true_w) <= 1.05
    accuracy = float(preference_metrics(chosen @ fitted["w"], rejected @ fitted["w"])["accuracy"])
    # Accuracy on the observed (noisy) labels matches the Bayes rate of the true reward.
    assert abs(accuracy - bayes) <= 0.005


def test_centering_centres_without_changing_the_ranking():
    _, chosen, rejected, _ = _linear_task(seed=1)
    plain, centred = _fit(chosen, rejected), _fit(chosen, rejected, center=0.01)
    both = jnp.concatenate([chosen, rejected])
    assert abs(float(jnp.mean(both @ centred["w"] + centred["b"]))) < 1e-3
    accuracy = lambda p: float(jnp.mean((chosen @ p["w"]) > (rejected @ p["w"])))  # noqa: E731
    assert abs(accuracy(centred) - accuracy(plain)) <= 0.005


def test_invariances():
    rng = np.random.default_rng(0)
    r_plus, r_minus = jnp.asarray(rng.normal(size=64)), jnp.asarray(rng.normal(size=64))
    base = bradley_terry_loss(r_plus, r_minus)
    # A constant added to every reward (the head bias) changes nothing.
    np.testing.assert_allclose(bradley_terry_loss(r_plus + 7.0, r_minus + 7.0), base, atol=1e-6)
    # Swapping the sides and flipping a soft label gives the same loss.
    p = jnp.asarray(rng.random(64))
    np.testing.assert_allclose(
        bradley_terry_loss(r_plus, r_minus, label=p),
        bradley_terry_loss(r_minus, r_plus, label=1 - p),
        atol=1e-6,
    )
    # A margin demands more: the loss grows with it.
    assert float(bradley_terry_loss(r_plus, r_minus, margin=1.0).mean()) > float(base.mean())


def test_metrics():
    metrics = preference_metrics(jnp.asarray([2.0, 0.0]), jnp.asarray([1.0, 1.0]))
    assert float(metrics["accuracy"]) == 0.5
    assert float(metrics["mean_margin"]) == 0.0
    assert float(metrics["reward_mean"]) == pytest.approx(1.0)
