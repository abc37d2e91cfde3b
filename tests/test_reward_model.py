"""The reward model reads the last real token's hidden state; a linear probe learns on frozen
features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reward_checks import assert_head_is_linear_probe, jitted_features

from posttrain.data.preferences import PreferenceRows
from posttrain.models import Transformer, get_preset, init_params
from posttrain.rewards.reward_model import (
    fit_linear_probe,
    init_head,
    reward_scores,
    save_reward_model,
)

CONFIG = get_preset("tiny_gemma2")


# Jitted: run op by op, these small forwards took seconds each.
_reward_scores = jax.jit(reward_scores, static_argnums=0)


def test_scores_read_the_last_real_token_whatever_the_padding():
    backbone = init_params(CONFIG, jax.random.key(0))
    head = {"w": jax.random.normal(jax.random.key(1), (CONFIG.embed_dim,)), "b": jnp.float32(0.5)}
    params = {"backbone": backbone, "head": head}
    row = jax.random.randint(jax.random.key(2), (9,), 3, CONFIG.vocab_size)
    alone = jax.jit(lambda p, t: Transformer(CONFIG).apply({"params": p}, t, compute_logits=False))(
        backbone, row[None]
    )
    expected = float(alone.hidden[0, -1] @ head["w"] + head["b"])
    right = jnp.zeros((1, 14), jnp.int32).at[0, :9].set(row)
    left = jnp.zeros((1, 14), jnp.int32).at[0, 5:].set(row)
    right_segments = (jnp.arange(14) < 9).astype(jnp.int32)[None]
    left_segments = (jnp.arange(14) >= 5).astype(jnp.int32)[None]
    for tokens, segments in ((right, right_segments), (left, left_segments)):
        np.testing.assert_allclose(
            float(_reward_scores(CONFIG, params, tokens, segments)[0]), expected, atol=1e-5
        )
    assert (
        float(
            _reward_scores(CONFIG, {**params, "head": init_head(CONFIG)}, right, right_segments)[0]
        )
        == 0.0
    )


def test_linear_probe_separates_preferences_on_frozen_features():
    backbone = init_params(CONFIG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(3), (64, 10), 3, CONFIG.vocab_size)
    features = jitted_features(CONFIG)(backbone, tokens, jnp.ones_like(tokens))
    direction = jax.random.normal(jax.random.key(4), (CONFIG.embed_dim,))
    score = features @ direction
    chosen, rejected = features[:32], features[32:]
    swap = (score[:32] < score[32:])[:, None]  # prefer the higher hidden reward
    chosen, rejected = jnp.where(swap, rejected, chosen), jnp.where(swap, chosen, rejected)
    head = fit_linear_probe(chosen, rejected, steps=300)
    accuracy = float(jnp.mean(chosen @ head["w"] > rejected @ head["w"]))
    assert accuracy == 1.0


def _bradley_terry_mle(differences: np.ndarray) -> np.ndarray:
    """argmin_w mean(-log sigmoid(differences @ w)) by Newton's method in float64."""
    w = np.zeros(differences.shape[1])
    for _ in range(30):
        p = 1.0 / (1.0 + np.exp(-(differences @ w)))
        gradient = -np.mean((1.0 - p)[:, None] * differences, axis=0)
        hessian = (differences * (p * (1.0 - p))[:, None]).T @ differences / len(differences)
        w -= np.linalg.solve(hessian, gradient)
    return w


def test_linear_probe_is_the_bradley_terry_maximum_likelihood_head():
    # Given pairs whose preference is drawn from a logistic model on their feature difference
    # (not separable, so the maximum-likelihood head is finite and unique), and a shared offset
    # that the difference cancels, when the probe fits them, then its head is the closed-form
    # optimum of the BT loss on chosen-minus-rejected features.
    rng = np.random.default_rng(0)
    n, d = 512, CONFIG.embed_dim
    true_w = rng.normal(size=d)
    true_w *= 2.0 / np.linalg.norm(true_w)
    difference = rng.normal(size=(n, d))
    first_preferred = rng.random(n) < 1.0 / (1.0 + np.exp(-(difference @ true_w)))
    difference = np.where(first_preferred[:, None], difference, -difference)
    offset = rng.normal(size=(n, d)) + 3.0
    chosen = (offset + difference / 2).astype(np.float32)
    rejected = (offset - difference / 2).astype(np.float32)
    expected = _bradley_terry_mle(chosen.astype(np.float64) - rejected.astype(np.float64))

    head = fit_linear_probe(jnp.asarray(chosen), jnp.asarray(rejected))
    w = np.asarray(head["w"], np.float64)
    assert np.linalg.norm(w - expected) < 1e-3 * np.linalg.norm(expected)
    assert w @ true_w / (np.linalg.norm(w) * np.linalg.norm(true_w)) > 0.8  # recovers the model
    zero = init_head(CONFIG)
    assert head["w"].shape == zero["w"].shape and np.linalg.norm(w - zero["w"]) > 1.0


def test_head_check_catches_a_head_that_skipped_the_probe(tmp_path):
    # Given 16 preference rows and a backbone, the stage-level check accepts the head the probe
    # fits and names a zero (init_head) head, as a stage that skipped the probe saves.
    backbone = init_params(CONFIG, jax.random.key(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(6), (32, 10), 3, CONFIG.vocab_size))
    segments = np.ones_like(tokens)
    segments[::3, 7:] = 0  # some right padding
    tokens = tokens * segments
    rows = PreferenceRows(
        tokens[:16], segments[:16], tokens[16:], segments[16:], np.zeros(16), np.ones(16)
    )
    features = jitted_features(CONFIG)
    probed = fit_linear_probe(
        features(backbone, rows.chosen, rows.chosen_segments),
        features(backbone, rows.rejected, rows.rejected_segments),
    )
    save_reward_model(CONFIG, {"backbone": backbone, "head": probed}, tmp_path / "probed")
    assert_head_is_linear_probe(tmp_path / "probed", rows, pairs=256)
    save_reward_model(CONFIG, {"backbone": backbone, "head": init_head(CONFIG)}, tmp_path / "zero")
    with pytest.raises(AssertionError, match="init_head"):
        assert_head_is_linear_probe(tmp_path / "zero", rows, pairs=256)
