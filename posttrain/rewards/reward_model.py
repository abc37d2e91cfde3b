"""A reward model: the Gemma backbone with a scalar head on the last response token.

r(x, y) = w · h_last + b, where h_last is the final normalised hidden state at the last
non-padding token of [prompt ; response] (its `<end_of_turn>`). The backbone parameters are the
policy's tree (an SFT checkpoint); the head is a separate small tree, so WARM can average
either. The head can start from a linear probe fitted on frozen features.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from posttrain.losses.bradley_terry import bradley_terry_loss
from posttrain.models import ModelConfig, Transformer

Array = jax.Array
Params = dict[str, Any]


def init_head(config: ModelConfig) -> Params:
    """A zero head: every response scores 0 until trained."""
    return {"w": jnp.zeros((config.embed_dim,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def last_token_features(
    config: ModelConfig, backbone: Params, tokens: Array, segment_ids: Array
) -> Array:
    """Final hidden state [b, d] (float32) at each row's last non-padding token."""
    out = Transformer(config).apply(
        {"params": backbone}, tokens, None, segment_ids, compute_logits=False
    )
    index = jnp.arange(tokens.shape[1])
    last = jnp.max(jnp.where(segment_ids > 0, index, -1), axis=1)  # works for left or right padding
    return jnp.take_along_axis(out.hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)


def reward_scores(config: ModelConfig, params: Params, tokens: Array, segment_ids: Array) -> Array:
    """Rewards [b] for token rows; params = {'backbone': ..., 'head': {'w', 'b'}}."""
    features = last_token_features(config, params["backbone"], tokens, segment_ids)
    return features @ params["head"]["w"] + params["head"]["b"]


def fit_linear_probe(
    chosen_features: Array, rejected_features: Array, steps: int = 500, learning_rate: float = 0.05
) -> Params:
    """A head fitted by the Bradley-Terry loss on frozen features [n, d] of preference pairs."""
    head = {"w": jnp.zeros(chosen_features.shape[1], jnp.float32), "b": jnp.zeros((), jnp.float32)}
    optimizer = optax.adam(learning_rate)

    def loss(h: Params) -> Array:
        return jnp.mean(
            bradley_terry_loss(
                chosen_features @ h["w"] + h["b"], rejected_features @ h["w"] + h["b"]
            )
        )

    @jax.jit
    def step(h: Params, state: Any) -> tuple[Params, Any]:
        updates, state = optimizer.update(jax.grad(loss)(h), state, h)
        return optax.apply_updates(h, updates), state

    state = optimizer.init(head)
    for _ in range(steps):
        head, state = step(head, state)
    return head
