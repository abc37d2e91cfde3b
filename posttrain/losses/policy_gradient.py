"""REINFORCE with a KL penalty: shaped rewards, baselines and losses (algorithms.md §5).

Shapes: b rows (= p prompts x k samples, prompt-major: row = prompt·k + sample), t response
tokens. Token log-probs and masks are [b, t] float32, rewards [b] or [p, k]; every loss returns
one value per row [b], for the caller to average (or to sum and divide by a global count).

The on-policy step of WARP's Algorithm 1, in the order the functions are called:
    R = kl_shaped_reward(r, sequence_log_prob(π), sequence_log_prob(π_ref), β)   # sg inside
    A, carried = compute_advantages(R.reshape(p, k), "rloo", carried)
    loss = mean(reinforce_loss(token_log_probs_π, mask, A))
Its gradient is an unbiased estimate of ∇(E[r] − β·KL(π‖π_ref)) because E_π[∇log π] = 0
removes the derivative of the β·log π term that the stop-gradient drops.

Which log-probabilities: the score-function identity holds only under the distribution that
drew the samples. With a temperature other than 1, top-k or top-p, the differentiable
`token_log_probs` must be recomputed with the same modification (the differentiable counterpart
of the sampler's `policy_log_probs`), not the plain model's (`model_log_probs`): under the
modified sampler E[∇log π_model] ≠ 0, so the gradient would depend on the baseline's constant.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from posttrain.losses.kl import sequence_log_prob

Array = jax.Array

sg = jax.lax.stop_gradient


def kl_shaped_reward(
    reward: Array,
    policy_log_prob: Array,
    reference_log_prob: Array,
    beta: float,
    lengths: Array | None = None,
    length_penalty: float = 0.0,
) -> Array:
    """R = r − β·sg(log π(y) − log π_ref(y)) − c·length per row [b] (WARP Eq. 1, sequence KL).

    `policy_log_prob` is log π(y) [b] of the policy that drew y (the sampler's
    `policy_log_probs` summed, or π_old's with extra epochs); `reference_log_prob` is the
    reference's or anchor's on the same tokens. `length_penalty` c with `lengths` [b] response
    tokens gives WARP's optional −0.0005·len(y) (c = 0.0005).
    """
    shaped = reward.astype(jnp.float32) - beta * sg(policy_log_prob - reference_log_prob)
    if length_penalty:
        if lengths is None:
            raise ValueError("length_penalty needs the response lengths")
        shaped = shaped - length_penalty * lengths.astype(jnp.float32)
    return shaped


# ----------------------------------------------------------------------------------------------
# Baselines. Each takes rewards [p, k] and a carried float32 scalar (only the moving average
# reads it; the others hand it back unchanged) and returns (advantages [p, k], carried).

Baseline = Callable[[Array, Array], tuple[Array, Array]]


def leave_one_out_mean(values: Array) -> Array:
    """For each sample, the mean of the other k−1 samples of its prompt: [p, k] -> [p, k]."""
    k = values.shape[1]
    if k < 2:
        raise ValueError(f"a leave-one-out mean needs k >= 2 samples per prompt, got k={k}")
    return (jnp.sum(values, axis=1, keepdims=True) - values) / (k - 1)


def no_baseline(rewards: Array, carried: Array) -> tuple[Array, Array]:
    """A = R: unbiased, the highest variance."""
    return rewards, carried


def moving_average_baseline(
    rewards: Array, carried: Array, decay: float = 0.9
) -> tuple[Array, Array]:
    """A = R − b with b the carried EMA of earlier batches' mean reward; b ← α·b + (1−α)·mean(R).

    Unbiased because b is computed before this batch was drawn. α = `decay` (0.9-0.99 in
    algorithms.md §5.3); start `carried` at 0 or at a first batch's mean reward.
    """
    advantages = rewards - carried
    return advantages, decay * carried + (1.0 - decay) * jnp.mean(rewards)


def rloo_baseline(rewards: Array, carried: Array) -> tuple[Array, Array]:
    """A_i = R_i − mean_{j≠i} R_j over the k ≥ 2 samples of a prompt (Ahmadian et al. 2024)."""
    return rewards - leave_one_out_mean(rewards), carried


def mean_baseline(rewards: Array, carried: Array) -> tuple[Array, Array]:
    """A_i = R_i − mean_j R_j, self included: BIASED, the expected gradient is scaled by (k−1)/k.

    It equals the RLOO advantage times (k−1)/k, so the direction is right but the step is
    shorter; it is not an unbiased estimator of the gradient.
    """
    return rewards - jnp.mean(rewards, axis=1, keepdims=True), carried


def group_normalized_baseline(
    rewards: Array, carried: Array, epsilon: float = 1e-6
) -> tuple[Array, Array]:
    """A = (R − mean)/(std + ε) per prompt (GRPO): CHANGES the objective, not just the variance.

    Dividing by a per-prompt std rescales each prompt's reward, so the gradient is that of a
    different objective; do not use it when comparing to the papers. std is the population std
    of the k samples.
    """
    centred = rewards - jnp.mean(rewards, axis=1, keepdims=True)
    return centred / (jnp.std(rewards, axis=1, keepdims=True) + epsilon), carried


BASELINES: dict[str, Baseline] = {
    "none": no_baseline,
    "moving_average": moving_average_baseline,
    "rloo": rloo_baseline,
    "mean": mean_baseline,
    "group_normalized": group_normalized_baseline,
}


def get_baseline(name: str) -> Baseline:
    """The registered baseline `name`; an unknown name fails listing the known ones."""
    try:
        return BASELINES[name]
    except KeyError:
        raise ValueError(
            f"unknown baseline {name!r}; known: {', '.join(sorted(BASELINES))}"
        ) from None


def compute_advantages(
    rewards: Array,
    baseline: str = "rloo",
    carried: Array | float = 0.0,
    samples_per_prompt: int | None = None,
    **baseline_options: float,
) -> tuple[Array, Array]:
    """(advantages [p, k], carried) for rewards [p, k], or [b] prompt-major with k given.

    `baseline_options` go to the baseline (`decay` for moving_average, `epsilon` for
    group_normalized).
    """
    if rewards.ndim == 1:
        if samples_per_prompt is None:
            raise ValueError("rewards [b] need samples_per_prompt (k) to be grouped by prompt")
        rewards = rewards.reshape(-1, samples_per_prompt)
    return get_baseline(baseline)(
        rewards.astype(jnp.float32), jnp.asarray(carried, jnp.float32), **baseline_options
    )


# ----------------------------------------------------------------------------------------------
# Losses.


def reinforce_loss(token_log_probs: Array, mask: Array, advantages: Array) -> Array:
    """−sg(A)·Σ_t log π(y_t|s_t) per row [b]; advantages [b] or [p, k] (reshaped to [b]).

    `token_log_probs` [b, t] are differentiable log-probs of the policy that drew the samples.
    """
    advantages = sg(advantages.reshape(token_log_probs.shape[0]).astype(jnp.float32))
    return -advantages * sequence_log_prob(token_log_probs, mask)


def kl_reward_to_go(
    reward: Array,
    policy_token_log_probs: Array,
    other_token_log_probs: Array,
    mask: Array,
    beta: float,
) -> Array:
    """G_t = r + Σ_{t'≥t} c_{t'}, c_t = −β·sg(log π − log q)(y_t|s_t): [b] and [b, t] -> [b, t].

    Per-token KL shaping (PPO style, algorithms.md §5.4): token t is credited the sequence
    reward r plus the KL penalties of itself and the tokens after it. The penalties before t
    depend only on the prefix, whose score E[∇log π(y_t|s_t) | s_t] is 0, so dropping them keeps
    the expected gradient of the sequence estimator and removes their noise. G_0 is the
    sequence-level shaped reward; padding holds 0. y ~ π: `policy_token_log_probs` are those of
    the policy that drew the samples.
    """
    mask = mask.astype(bool)
    penalties = jnp.where(mask, -beta * sg(policy_token_log_probs - other_token_log_probs), 0.0)
    to_go = jax.lax.cumsum(penalties.astype(jnp.float32), axis=1, reverse=True)
    return jnp.where(mask, reward.astype(jnp.float32)[:, None] + to_go, 0.0)


def per_token_reinforce_loss(token_log_probs: Array, mask: Array, token_advantages: Array) -> Array:
    """−Σ_t sg(G_t − b)·log π(y_t|s_t) per row [b], `token_advantages` = G_t − b [b, t].

    Take G from `kl_reward_to_go` and b from other samples only (e.g. the leave-one-out mean of
    the sequence rewards G_0), so the baseline keeps the gradient unbiased.
    """
    weighted = sg(token_advantages.astype(jnp.float32)) * token_log_probs
    return -jnp.sum(jnp.where(mask.astype(bool), weighted, 0.0), axis=-1)


def clipped_ratio_loss(
    new_token_log_probs: Array,
    old_token_log_probs: Array,
    mask: Array,
    advantages: Array,
    epsilon: float = 0.2,
) -> Array:
    """−min(ρA, clip(ρ, 1−ε, 1+ε)A), sequence ratio ρ = exp(Σ_t new − Σ_t old), per row [b].

    For extra epochs on one batch: `old_token_log_probs` are π_old's (the policy that drew the
    samples), and the advantages' KL term should be computed with π_old as well (TRL RLOO). At
    new == old the gradient is reinforce_loss's; a sample whose ratio left the band in the
    direction its advantage pushes gets no gradient.
    """
    advantages = sg(advantages.reshape(new_token_log_probs.shape[0]).astype(jnp.float32))
    log_ratio = sequence_log_prob(new_token_log_probs, mask) - sg(
        sequence_log_prob(old_token_log_probs, mask)
    )
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon)
    return -jnp.minimum(ratio * advantages, clipped * advantages)
