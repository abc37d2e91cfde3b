"""The reward model reads the last real token's hidden state; a linear probe learns on frozen
features."""

import jax
import jax.numpy as jnp
import numpy as np

from posttrain.models import Transformer, get_preset, init_params
from posttrain.rewards.reward_model import (
    fit_linear_probe,
    init_head,
    last_token_features,
    reward_scores,
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
    features = last_token_features(CONFIG, backbone, tokens, jnp.ones_like(tokens))
    direction = jax.random.normal(jax.random.key(4), (CONFIG.embed_dim,))
    score = features @ direction
    chosen, rejected = features[:32], features[32:]
    swap = (score[:32] < score[32:])[:, None]  # prefer the higher hidden reward
    chosen, rejected = jnp.where(swap, rejected, chosen), jnp.where(swap, chosen, rejected)
    head = fit_linear_probe(chosen, rejected, steps=300)
    accuracy = float(jnp.mean(chosen @ head["w"] > rejected @ head["w"]))
    assert accuracy == 1.0
