"""The exact Best-of-N distribution of a categorical policy, ties included.

BOND's Theorem 1 (`shared/design/algorithms.md` §6.2), in the closed form that handles reward
ties: with p_≤(y) = P_{y'∼π}[r(y') ≤ r(y)] and p_<(y) = P_{y'∼π}[r(y') < r(y)],

    π_BoN(y) = π(y) · (p_≤(y)^N − p_<(y)^N) / (p_≤(y) − p_<(y)).

p_≤ − p_< is the mass of y's tie class (the outcomes with y's reward): a reward level receives
F(r)^N − F(r⁻)^N of the Best-of-N mass, split inside the level in proportion to π. That split is
what first-index tie-breaking gives (and uniform tie-breaking too), so one formula covers both.
N may be any real ≥ 1 ("fractional Best-of-N", for smooth reference curves), and
BoN_n(BoN_m(π)) = BoN_{nm}(π), the identity behind iterative BOND.

These are analysis tools for small outcome spaces (bandits, acceptance tests, reference
curves), not estimators for language models. Shape letter: K outcomes. They compute in the
input's float dtype; the 1e-12 identities need float64 (`with jax.enable_x64(True)`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _tie_classes(probs: Array, rewards: Array) -> tuple[Array, Array]:
    """(mass below y's reward level, mass of y's level), each [K].

    The level's mass is summed directly rather than taken as a difference of two cumulative
    sums, so a light level above a heavy tail keeps its relative precision.
    """
    order = jnp.argsort(rewards, stable=True)  # [K]
    sorted_rewards = rewards[order]
    starts_a_level = jnp.concatenate([jnp.ones(1, bool), sorted_rewards[1:] != sorted_rewards[:-1]])
    level_of_sorted = jnp.cumsum(starts_a_level) - 1  # [K] level index, 0 = lowest reward
    size = rewards.shape[0]
    level_mass = jax.ops.segment_sum(probs[order], level_of_sorted, num_segments=size)
    mass_below = jnp.cumsum(level_mass) - level_mass  # exclusive cumulative sum per level
    level = jnp.zeros(size, level_of_sorted.dtype).at[order].set(level_of_sorted)
    return mass_below[level], level_mass[level]


def quantile_le(probs: Array, rewards: Array) -> Array:
    """p_≤(y) = P_{y'∼π}[r(y') ≤ r(y)] for every outcome, [K]."""
    below, tied = _tie_classes(probs, rewards)
    return below + tied


def quantile_lt(probs: Array, rewards: Array) -> Array:
    """p_<(y) = P_{y'∼π}[r(y') < r(y)] for every outcome, [K]."""
    return _tie_classes(probs, rewards)[0]


def mid_rank_cdf(probs: Array, rewards: Array) -> Array:
    """F_mid(y) = (p_<(y) + p_≤(y))/2, the mid-rank CDF: E_π[F_mid] = 1/2 exactly, [K].

    Without ties this is §8.5's p_<(y) + π(y)/2; with ties half of the whole tie class's mass
    is added (p_< + π(y)/2 would no longer average to 1/2).
    """
    below, tied = _tie_classes(probs, rewards)
    return below + tied / 2


def best_of_n_probabilities(probs: Array, rewards: Array, n: float | Array) -> Array:
    """π_BoN(y) for every outcome [K]: exact, ties split in proportion to π, real n ≥ 1.

    (a^N − b^N)/(a − b) with a = p_≤, b = p_< = a − t is evaluated as
    a^N · (1 − (1 − t/a)^N) / t through expm1/log1p: the direct difference loses every digit
    when the tie mass t is tiny next to a (a rare outcome near the top of the ranking).
    """
    below, tied = _tie_classes(probs, rewards)
    at_or_below = below + tied
    safe_tied = jnp.where(tied > 0, tied, 1.0)
    safe_le = jnp.where(at_or_below > 0, at_or_below, 1.0)
    level_gain = -jnp.expm1(n * jnp.log1p(-tied / safe_le))  # 1 − (p_</p_≤)^N
    bon = probs / safe_tied * safe_le**n * level_gain
    # A level of zero mass is never drawn, so it is never the best.
    return jnp.where(tied > 0, bon, 0.0)


def best_of_n_working_approximation(probs: Array, rewards: Array, n: float | Array) -> Array:
    """q̃ ∝ π·p_≤^{N−1}, [K]: the normalised fixed point of BOND's backward-KL reward.

    BOND drops the factor (B) of Theorem 1 (§7.4), so a backward-KL-only run converges here,
    not to π_BoN; the two differ by KL ≈ 3e-2 on a 200-outcome bandit and vanish as outcomes
    become individually unlikely (§7.10).
    """
    unnormalised = probs * quantile_le(probs, rewards) ** (n - 1)
    return unnormalised / jnp.sum(unnormalised)


def best_of_n_kl_bound(n: float | Array) -> Array:
    """log N − (N−1)/N: KL(π_BoN‖π) without ties, an upper bound with them (§6.3)."""
    n = jnp.asarray(n)
    return jnp.log(n) - (n - 1) / n
