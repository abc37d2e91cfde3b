"""Sequence log-probabilities and KL estimators from policy samples (algorithms.md §0.1-0.2).

Shapes: b rows (prompts x samples), t response tokens. Inputs are per-token log-probabilities
[b, t] of the sampled tokens and a response mask [b, t] (1 on response tokens, the generated
end-of-turn token included, 0 on padding); outputs are per-row values [b] in nats per sequence.

Which log-probabilities: an estimator from samples is unbiased only under the distribution that
drew the samples. With a temperature other than 1, top-k or top-p the sampler draws from a
modified policy, so `policy_token_log_probs` must be the sampler's `policy_log_probs` (or the
trainer's recomputation with the same modification), not `model_log_probs`; the two agree only
for plain sampling at temperature 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _masked_sum(token_values: Array, mask: Array) -> Array:
    """Σ_t over response tokens [b, t] -> [b] float32.

    `jnp.where` rather than a product: padding may hold anything (a sampler writes 0, a
    misaligned reference -inf), and it must contribute an exact 0 to the value and gradient.
    """
    return jnp.sum(jnp.where(mask.astype(bool), token_values.astype(jnp.float32), 0.0), axis=-1)


def sequence_log_prob(token_log_probs: Array, mask: Array) -> Array:
    """log π(y|x) = Σ_t mask·log π(y_t|s_t): [b, t] token log-probs and mask -> [b] float32."""
    return _masked_sum(token_log_probs, mask)


def kl_k1(policy_token_log_probs: Array, other_token_log_probs: Array, mask: Array) -> Array:
    """k1(y) = log π(y) − log q(y) per row [b]: unbiased for KL(π‖q), can be negative per row.

    y ~ π, so `policy_token_log_probs` are those of the policy that drew the samples (the
    sampler's `policy_log_probs`); `other_token_log_probs` are q's on the same tokens.
    """
    return _masked_sum(policy_token_log_probs - other_token_log_probs, mask)


def kl_k3(policy_token_log_probs: Array, other_token_log_probs: Array, mask: Array) -> Array:
    """k3(y) = Σ_t exp(ρ_t) − ρ_t − 1, ρ_t = log q − log π, per row [b]: unbiased for KL(π‖q).

    Each term is ≥ 0 and, given the prefix, unbiased for the per-position KL, so the sum has a
    lower variance than k1 when π is near q. For logging: as a differentiable loss its gradient
    is that of the forward KL(q‖π), not of KL(π‖q) (algorithms.md §5.4). y ~ π, so
    `policy_token_log_probs` are those of the policy that drew the samples (the sampler's
    `policy_log_probs`).
    """
    # Padding is replaced before exp: exp of a junk log-ratio could overflow to inf, and
    # where(mask, inf, 0) would still give a NaN gradient.
    log_ratio = jnp.where(
        mask.astype(bool),
        (other_token_log_probs - policy_token_log_probs).astype(jnp.float32),
        0.0,
    )
    return _masked_sum(jnp.expm1(log_ratio) - log_ratio, mask)
