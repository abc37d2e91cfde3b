"""BOND and J-BOND losses (Sessa et al., arXiv 2407.14622; `shared/design/algorithms.md` §7-8).

Pure functions of sequence log-probabilities and rewards returning per-prompt values; they know
nothing of models, so a tabular softmax policy exercises them in tests and Gemma in production.
A sequence log-prob is the float32 sum of token log-probs over the response mask (§0.1).

Shape letters: p prompts, k anchor (reference) samples per prompt, c policy samples per prompt
(the brief's k_pol), N the Best-of-N size.

Which log-probs: every `policy_seq` must be the log-probability under the distribution the
policy sample was actually drawn from, recomputed with gradients. The backward terms are
score-function (REINFORCE) estimators, unbiased only for the sampling distribution; a sample
drawn at temperature τ or with top-k/top-p comes from that modified policy, so its log-prob is
log_softmax(logits/τ) renormalised over the kept tokens (what the sampler reports, without
gradients, as `policy_log_probs`; its `model_log_probs` are the unmodified model's and do not
fit). The reference/anchor log-probs in the KL terms must use the same transform, and p_≤ is
then the quantile under the modified reference. Train with plain temperature-1 sampling where
possible: under truncation a reference sample's best-of-N pick can be outside the policy's kept
set, and its forward-KL term is then infinite.

Iterative BOND (§7.6, Algorithm 1) needs no loss of its own: the stage keeps an anchor
parameter tree, samples the forward-KL pool and the quantile anchors from it instead of π_ref,
and sets anchor = params whenever `should_replace_anchor(step, period)` (the paper: every 1000
steps with n ∈ {2, 4}). J-BOND replaces that hard copy by an EMA after every step,
`posttrain.train.step.ema_update(anchor, params, rate=η)` (paper eq. 18).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from posttrain.losses.policy_gradient import leave_one_out_mean

Array = jax.Array

# −log 16 = 4·log ½: the J-BOND penalty, chosen so that its expectation −log16·(1 − p_≤)²
# equals log p_≤ at the median (paper eq. 24).
JBOND_PENALTY = -math.log(16.0)


def log_quantile(policy_rewards: Array, anchor_rewards: Array, smoothing: str = "add_one") -> Array:
    """log p̂_≤ of each policy sample against k anchor samples of its prompt, [p] or [p, c].

    policy_rewards is [p] or [p, c]; anchor_rewards is [p, k], rewards of samples of the
    reference (or anchor) policy for the same prompt, shared by that prompt's policy samples.
    - "add_one" (default, [D]): (1 + #{r_anchor ≤ r}) / (k + 1), counting the sample itself
      as one more draw, so the estimate is never 0 and log p̂ stays finite.
    - "monte_carlo": #{r_anchor ≤ r} / k (the paper's eq. 10), clipped below at 1/(2k), half a
      count, so a sample worse than every anchor gets a finite, worst-possible log-quantile.
    Both are biased low in log space (Jensen); the bias shrinks as k grows (k = 16 in the paper).
    """
    policy_rewards = jnp.asarray(policy_rewards, jnp.float32)
    anchor_rewards = jnp.asarray(anchor_rewards, jnp.float32)
    k = anchor_rewards.shape[-1]
    # [p, 1.., k]: one anchor pool per prompt, broadcast over that prompt's policy samples.
    anchors = anchor_rewards.reshape(
        anchor_rewards.shape[:1] + (1,) * (policy_rewards.ndim - 1) + (k,)
    )
    at_or_below = jnp.sum(anchors <= policy_rewards[..., None], axis=-1).astype(jnp.float32)
    if smoothing == "add_one":
        return jnp.log((1.0 + at_or_below) / (k + 1.0))
    if smoothing == "monte_carlo":
        return jnp.log(jnp.maximum(at_or_below / k, 0.5 / k))
    raise ValueError(f"smoothing must be 'add_one' or 'monte_carlo', got {smoothing!r}")


def bond_backward_return(
    log_quantile: Array, policy_seq: Array, reference_seq: Array, n: float
) -> Array:
    """R = (N−1)·log p̂_≤ − sg(log π − log π_ref) + log N, same shape as policy_seq.

    The backward-KL return of BOND eq. (15): R estimates log π_BoN(y) − log π(y) with Theorem
    1's factor (B) replaced by its no-ties limit N, as the paper drops (B); so −E_π[R] is a
    working estimate of KL(π‖π_BoN). The constant log N changes no gradient once a baseline is
    subtracted. R is a return, not a loss: use it through advantages in `bond_loss`.
    """
    log_ratio = jax.lax.stop_gradient(policy_seq - reference_seq)
    return (n - 1.0) * log_quantile - log_ratio + math.log(n)


def batch_leave_one_out_baseline(returns: Array) -> Array:
    """b_i = mean of the other prompts' returns, [p] (or [p, c], over all p·c entries).

    The baseline of BOND §4 and J-BOND's Algorithm 2 ("average return of the other generations
    in the batch"); it leaves every advantage unbiased because b_i ignores sample i.
    """
    # The whole batch as one group of p·c samples for the per-prompt leave-one-out mean.
    flat = jax.lax.stop_gradient(returns).reshape(1, -1)
    return leave_one_out_mean(flat).reshape(returns.shape)


def _policy_gradient_loss(advantages: Array, policy_seq: Array) -> Array:
    """−sg(A)·log π(y), averaged over a prompt's policy samples: [p]."""
    loss = -jax.lax.stop_gradient(advantages) * policy_seq
    return loss if loss.ndim == 1 else jnp.mean(loss, axis=tuple(range(1, loss.ndim)))


def bond_loss(best_anchor_seq: Array, policy_seq: Array, advantages: Array, beta: float) -> Array:
    """BOND's Jeffreys_β loss per prompt, [p]: (1−β)·(−log π(y_best)) + β·(−sg(A)·log π(y)).

    best_anchor_seq [p]: log π(y_best), y_best the first-maximal-reward sample of N reference
    (or anchor) samples — the forward KL(π_BoN‖π) as supervised learning (§7.3).
    policy_seq [p] or [p, c] and advantages of the same shape: A = R − b for R from
    `bond_backward_return` and a baseline b (batch mean, leave-one-out across the batch, or
    RLOO across the c samples of a prompt) — the backward KL(π‖π_BoN) by policy gradient
    (§7.4). β = 0 is forward only, β = 1 backward only, the paper's default is 0.5.
    """
    forward = -best_anchor_seq
    backward = _policy_gradient_loss(advantages, policy_seq)
    return (1.0 - beta) * forward + beta * backward


def should_replace_anchor(step: int | Array, period: int) -> Array:
    """True after every `period`-th optimizer step (step counted from 0): iterative BOND's copy.

    Call it with the step just taken; at True the stage sets anchor = params, so anchor t
    distils Best-of-n of the policy that ended distillation round t − 1.
    """
    if period < 1:
        raise ValueError(f"period must be >= 1, got {period}")
    return (jnp.asarray(step) + 1) % period == 0


def jbond_reward(policy_rewards: Array, anchor_rewards: Array) -> Array:
    """r_J = −log 16 · 1[r(y) < min(r(y'₁), r(y'₂))], [p] or [p, c] (paper eq. 17).

    anchor_rewards [p, 2]: rewards of two anchor samples of the prompt, shared by its c policy
    samples when policy_rewards is [p, c]. The "<" is strict: a
    sample tied with the worse anchor draw is not penalised (the tie-consistent reading, §8.1).
    E over the anchor draws is −log16·(1 − p_≤(y))², a bounded stand-in for log p_≤ that is
    exact at the median.
    """
    policy_rewards = jnp.asarray(policy_rewards, jnp.float32)
    worst_anchor = jnp.min(jnp.asarray(anchor_rewards, jnp.float32), axis=-1)
    worst_anchor = worst_anchor.reshape(worst_anchor.shape + (1,) * (policy_rewards.ndim - 1))
    return jnp.where(policy_rewards < worst_anchor, JBOND_PENALTY, 0.0).astype(jnp.float32)


def jbond_return(reward: Array, policy_seq: Array, anchor_seq: Array) -> Array:
    """R = r_J − sg(log π(y) − log π_anchor(y)), [p] or [p, c]: Algorithm 2's return, no baseline.

    The log-ratio is the backward KL's own regulariser toward the anchor (coefficient
    1/(n−1) = 1 for Best-of-2).
    """
    return reward - jax.lax.stop_gradient(policy_seq - anchor_seq)


def jbond_loss(
    best_anchor_seq: Array,
    policy_seq: Array,
    anchor_seq: Array,
    reward: Array,
    return_baseline: Array | float,
    log_ratio_baseline: Array | float,
    beta: float,
    gamma: float,
) -> Array:
    """J-BOND's per-prompt loss [p], whose gradient is (1−β)·G_FW + β·G_BW + γ·G_Reg.

    best_anchor_seq [p]: log π(y_best), y_best the better of the two anchor samples (first on
    ties). policy_seq [p]: log π(y) of the policy sample (the paper draws one), or [p, c] for c
    samples of each prompt, whose backward and regulariser terms are averaged; anchor_seq:
    log π_anchor(y) of the same samples. reward: `jbond_reward`, same shape. return_baseline b
    for the return `jbond_return`, log_ratio_baseline b' for log π − log π_anchor (e.g.
    `batch_leave_one_out_baseline` of each, or leave-one-out over a prompt's c samples; 0 is
    unbiased too, only noisier).

    G_Reg is ∇KL(π‖π_anchor) in policy-gradient form, +sg(log π − log π_anchor − b')·∇log π,
    descended here so γ > 0 pulls the policy toward the anchor, as eq. (19) says. Algorithm 2 as
    printed in arXiv v1 carries a leading minus that, with its own descent convention for G_FW
    and G_BW, would push the policy away from the anchor (§8.1).
    """
    advantages = jbond_return(reward, policy_seq, anchor_seq) - return_baseline
    log_ratio = jax.lax.stop_gradient(policy_seq - anchor_seq) - log_ratio_baseline
    forward = -best_anchor_seq
    backward = _policy_gradient_loss(advantages, policy_seq)
    regulariser = -_policy_gradient_loss(log_ratio, policy_seq)
    return (1.0 - beta) * forward + beta * backward + gamma * regulariser
