"""Assertions on saved reward models that stage tests share (imported by name, as hf_reference)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from posttrain.data.preferences import PreferenceRows
from posttrain.models import ModelConfig
from posttrain.rewards.reward_model import (
    fit_linear_probe,
    init_head,
    last_token_features,
    load_reward_model,
)


@functools.cache
def jitted_features(config: ModelConfig) -> Callable[..., jax.Array]:
    """`last_token_features` for `config`, jitted once per config (backbone, tokens, segments)."""
    return jax.jit(lambda p, t, s: last_token_features(config, p, t, s))


def assert_head_is_linear_probe(
    reward_model_dir: str | Path, rows: PreferenceRows, pairs: int, atol: float = 1e-5
) -> None:
    """Assert a saved head is the linear probe of its saved backbone on the first `pairs` rows.

    For a run of 0 training steps, whose saved backbone is the initial one: the probe is refit
    here from the library's pieces, so a stage that skipped or mis-fed the probe fails.
    """
    config, params = load_reward_model(reward_model_dir)
    n = min(pairs, len(rows.chosen))
    features = jitted_features(config)
    expected = fit_linear_probe(
        features(params["backbone"], rows.chosen[:n], rows.chosen_segments[:n]),
        features(params["backbone"], rows.rejected[:n], rows.rejected_segments[:n]),
    )
    saved = params["head"]
    assert not np.allclose(saved["w"], init_head(config)["w"]), (
        f"{reward_model_dir}: the head is init_head's (no probe was fitted)"
    )
    for name in ("w", "b"):
        np.testing.assert_allclose(
            saved[name], expected[name], atol=atol, err_msg=f"{reward_model_dir}: head {name}"
        )
