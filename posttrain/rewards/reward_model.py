"""A reward model: a backbone (any family) with a scalar head on the last response token.

r(x, y) = w · h_last + b, where h_last is the final normalised hidden state at the last
non-padding token of [prompt ; response] (its `<end_of_turn>`). The backbone parameters are the
policy's tree (an SFT checkpoint); the head is a separate small tree, so WARM can average
either. The head can start from a linear probe fitted on frozen features.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors.numpy import load_file, save_file

from posttrain.checkpoints import load_hf, save_hf
from posttrain.data.shared_prompt import ForkedPairs, SharedPromptPairs
from posttrain.losses.bradley_terry import bradley_terry_loss
from posttrain.models import backbone as backbones
from posttrain.models.backbone import BackboneConfig

HEAD_FILE = "head.safetensors"

Array = jax.Array
Params = dict[str, Any]


def init_head(config: BackboneConfig) -> Params:
    """A zero head: every response scores 0 until trained."""
    width = backbones.width(config)
    return {"w": jnp.zeros((width,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def last_token_features(
    config: BackboneConfig, backbone: Params, tokens: Array, segment_ids: Array
) -> Array:
    """Final hidden state [b, d] (float32) at each row's last non-padding token."""
    hidden = backbones.hidden_states(config, backbone, tokens, None, segment_ids)
    index = jnp.arange(tokens.shape[1])
    last = jnp.max(jnp.where(segment_ids > 0, index, -1), axis=1)  # works for left or right padding
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)


def reward_scores(
    config: BackboneConfig,
    params: Params,
    tokens: Array,
    segment_ids: Array,
    dropout_rate: float = 0.0,
    dropout_key: Array | None = None,
) -> Array:
    """Rewards [b] for token rows; params = {'backbone': ..., 'head': {'w', 'b'}}.

    With a key and a rate > 0, inverted dropout on the head's input features (training only).
    """
    features = last_token_features(config, params["backbone"], tokens, segment_ids)
    return _apply_head(params["head"], features, dropout_rate, dropout_key)


def shared_prompt_rewards(
    config: BackboneConfig,
    params: Params,
    pairs: SharedPromptPairs | ForkedPairs,
    dropout_rate: float = 0.0,
    dropout_key: Array | None = None,
) -> tuple[Array, Array]:
    """(chosen, rejected) rewards [b] of pairs whose shared prompt is computed once: one row per
    pair (`share_prompts`, attention backbones) or a prompt forked into both sides
    (`fork_prompts`, a recurrence); `backbone.prompt_sharing` says which a family reads.

    Branched rows run as two forwards over halves of the batch, as unshared pairs run as a chosen
    and a rejected forward: XLA:CPU runs independent forwards side by side, which a 2-core
    reward step needs (one forward of all rows: 7-30% longer steps, `experiments/bench/reward`).
    Forked pairs run in one pass: halving them nearly tripled the gradient's compile time, and
    no step time has been measured to pay for it.
    """
    rows = pairs.tokens.shape[0]
    forked = isinstance(pairs, ForkedPairs)
    bounds = [0, rows // 2, rows] if rows > 1 and not forked else [0, rows]
    features_of = _forked_features if forked else _shared_prompt_features
    features = [
        features_of(
            config, params["backbone"], jax.tree_util.tree_map(lambda x, a=a, b=b: x[a:b], pairs)
        )
        for a, b in itertools.pairwise(bounds)
    ]
    features = jnp.concatenate(features, axis=0).astype(jnp.float32)
    rewards = _apply_head(params["head"], features, dropout_rate, dropout_key)
    return rewards[:, 0], rewards[:, 1]


def _shared_prompt_features(
    config: BackboneConfig, backbone: Params, pairs: SharedPromptPairs
) -> Array:
    """Final hidden states [n, 2, d] at each row's chosen and rejected last tokens."""
    hidden = backbones.branched_hidden(
        config, backbone, pairs.tokens, pairs.positions, pairs.segments, pairs.branches
    )
    return jnp.take_along_axis(hidden, pairs.last[:, :, None], axis=1)


def _forked_features(config: BackboneConfig, backbone: Params, pairs: ForkedPairs) -> Array:
    """Final hidden states [n, 2, d] at each branch's last token."""
    hidden = backbones.forked_hidden(
        config,
        backbone,
        pairs.prompt,
        pairs.prompt_segments,
        pairs.tokens,
        pairs.positions,
        pairs.segments,
    )  # [n, 2, t, d]
    return jnp.take_along_axis(hidden, pairs.last[:, :, None, None], axis=2)[:, :, 0]


def _apply_head(
    head: Params, features: Array, dropout_rate: float, dropout_key: Array | None
) -> Array:
    # Inverted dropout on the features (training only), then the linear head.
    if dropout_key is not None and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, features.shape)
        features = jnp.where(keep, features / (1.0 - dropout_rate), 0.0)
    return features @ head["w"] + head["b"]


def save_reward_model(config: BackboneConfig, params: Params, directory: str | Path) -> Path:
    """Backbone as a Hugging Face directory plus the head as `head.safetensors`."""
    directory = Path(directory)
    save_hf(config, jax.tree.map(np.asarray, params["backbone"]), directory)
    head = {k: np.asarray(v, np.float32).reshape(-1) for k, v in params["head"].items()}
    tmp = directory / f".{HEAD_FILE}.tmp"
    save_file(head, str(tmp))
    tmp.replace(directory / HEAD_FILE)  # the head appears whole or not at all
    return directory


def load_reward_model(directory: str | Path) -> tuple[BackboneConfig, Params]:
    """(config, {'backbone', 'head'}) from `save_reward_model`'s directory, shapes checked."""
    directory = Path(directory)
    if not (directory / HEAD_FILE).exists():
        raise FileNotFoundError(f"{directory}: no {HEAD_FILE}; not a reward-model directory")
    config, backbone = load_hf(directory)
    head = load_file(str(directory / HEAD_FILE))
    width = backbones.width(config)
    if set(head) != {"w", "b"} or head["w"].shape != (width,) or head["b"].size != 1:
        shapes = {k: v.shape for k, v in head.items()}
        raise ValueError(f"{directory / HEAD_FILE}: expected w [{width}] and b [1], got {shapes}")
    return config, {
        "backbone": jax.tree.map(jnp.asarray, backbone),
        "head": {"w": jnp.asarray(head["w"]), "b": jnp.asarray(head["b"].reshape(()))},
    }


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
