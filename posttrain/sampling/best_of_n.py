"""Best-of-N: N samples per prompt, scored by any reward callable, best one kept.

Also the unbiased estimate of E[max reward of n draws] for every n <= N from one pool of N
(Nakano et al. 2021, App. I; `shared/design/algorithms.md` §6.4), which draws whole BoN curves
from a single sampling run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from scipy.special import gammaln

from posttrain.models import ModelConfig
from posttrain.sampling.sampler import SamplingConfig, sample

Params = dict[str, Any]
# Scores a batch of (prompt, response) token-id pairs: returns one float per pair.
RewardFn = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], Any]


class BestOfNOutput(NamedTuple):
    """The chosen response per prompt and the whole scored pool."""

    best_tokens: np.ndarray  # [b, max_new_tokens]
    best_rewards: np.ndarray  # [b]
    best_index: np.ndarray  # [b] index in the pool (first maximum on ties)
    pool_tokens: np.ndarray  # [b, n, max_new_tokens]
    pool_rewards: np.ndarray  # [b, n]
    pool_lengths: np.ndarray  # [b, n]
    pool_model_log_probs: np.ndarray  # [b, n] total log p of each response under the model


def best_of_n(
    config: ModelConfig,
    params: Params,
    prompts: Sequence[Sequence[int]],
    n: int,
    reward_fn: RewardFn,
    sampling: SamplingConfig | None = None,
    rng: jax.Array | None = None,
) -> BestOfNOutput:
    """Draw `n` samples per prompt in one batch, score them in one call, keep the best."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    sampling = sampling or SamplingConfig()
    repeated = [list(prompt) for prompt in prompts for _ in range(n)]
    out = sample(config, params, repeated, sampling, rng)
    tokens = np.asarray(out.tokens)
    lengths = np.asarray(out.lengths)
    responses = [row[:length].tolist() for row, length in zip(tokens, lengths, strict=True)]
    rewards = np.asarray(reward_fn(repeated, responses), np.float64)
    if rewards.shape != (len(repeated),):
        raise ValueError(
            f"reward_fn returned shape {rewards.shape}, expected ({len(repeated)},) "
            "(one reward per (prompt, response) pair)"
        )
    if not np.all(np.isfinite(rewards)):
        raise ValueError("reward_fn returned a non-finite reward")
    batch = len(prompts)
    pool_tokens = tokens.reshape(batch, n, -1)
    pool_rewards = rewards.reshape(batch, n)
    best = np.argmax(pool_rewards, axis=1)  # numpy returns the first maximum on ties
    log_probs = np.asarray(out.model_log_probs).sum(-1).reshape(batch, n)
    return BestOfNOutput(
        best_tokens=pool_tokens[np.arange(batch), best],
        best_rewards=pool_rewards[np.arange(batch), best],
        best_index=best,
        pool_tokens=pool_tokens,
        pool_rewards=pool_rewards,
        pool_lengths=lengths.reshape(batch, n),
        pool_model_log_probs=log_probs,
    )


def expected_best_of_n(rewards: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
    """Unbiased E[value of the best of n draws] for n = 1..N from pools [..., N].

    Draws are ranked by `rewards`; `values` (default: the rewards) is what is averaged, e.g. a
    gold reward of the proxy-selected sample. Returns [..., N], entry n-1 for best-of-n.
    """
    rewards = np.asarray(rewards, np.float64)
    values = rewards if values is None else np.asarray(values, np.float64)
    if values.shape != rewards.shape:
        raise ValueError(f"values shape {values.shape} differs from rewards {rewards.shape}")
    size = rewards.shape[-1]
    order = np.argsort(rewards, axis=-1, kind="stable")
    ranked = np.take_along_axis(values, order, axis=-1)  # ascending by reward
    i = np.arange(1, size + 1)[:, None]  # rank of the draw
    k = np.arange(1, size + 1)[None, :]  # n
    # weight[i, n] = C(i-1, n-1) / C(N, n): the chance that the best of a random n-subset is the
    # draw of rank i. Computed in log space, zero where i < n.
    log_weight = _log_comb(i - 1, k - 1) - _log_comb(np.full_like(k, size), k)
    weight = np.where(i >= k, np.exp(np.where(i >= k, log_weight, 0.0)), 0.0)
    return ranked @ weight


def _log_comb(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """log C(a, b) for 0 <= b <= a (elsewhere a finite placeholder)."""
    a, b = np.broadcast_arrays(a.astype(np.float64), b.astype(np.float64))
    valid = (b >= 0) & (b <= a)
    a, b = np.where(valid, a, 1.0), np.where(valid, b, 0.0)
    return gammaln(a + 1) - gammaln(b + 1) - gammaln(a - b + 1)
