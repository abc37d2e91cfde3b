"""Bradley-Terry preference loss on reward pairs (pure functions of rewards).

L = -log σ(r⁺ - r⁻ - m) per pair, optionally soft-labelled for ties, plus the optional
centering term c·(r⁺ + r⁻)² of Eisenstein et al. 2023 (`shared/design/algorithms.md` §2.2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def bradley_terry_loss(
    chosen: Array,
    rejected: Array,
    margin: Array | float = 0.0,
    label: Array | float = 1.0,
    center_coefficient: float = 0.0,
) -> Array:
    """Per-pair loss [b] for rewards r⁺ (chosen) and r⁻ (rejected), float32.

    `label` is P(chosen ≻ rejected): 1 for a plain preference, 0.5 for a tie (soft BT).
    `margin` (m) asks the chosen reward to win by at least m, as TRL's `margin` column does.
    """
    delta = (chosen - rejected).astype(jnp.float32) - margin
    # log σ(Δ) and log σ(-Δ) via log_sigmoid: stable for large |Δ|.
    loss = -(label * jax.nn.log_sigmoid(delta) + (1.0 - label) * jax.nn.log_sigmoid(-delta))
    if center_coefficient:
        loss = loss + center_coefficient * (chosen + rejected).astype(jnp.float32) ** 2
    return loss


def preference_metrics(chosen: Array, rejected: Array) -> dict[str, Array]:
    """Pairwise accuracy, mean margin, and reward mean/std over both sides (TRL's metrics)."""
    both = jnp.concatenate([chosen, rejected]).astype(jnp.float32)
    return dict(
        accuracy=jnp.mean((chosen > rejected).astype(jnp.float32)),
        mean_margin=jnp.mean(chosen - rejected),
        reward_mean=jnp.mean(both),
        reward_std=jnp.std(both),
    )
