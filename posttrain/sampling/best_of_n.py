"""Best-of-N: N samples per prompt, scored by a reward function, best one kept.

`best_of_n` takes prompt objects and the text `RewardFunction` of `posttrain.rewards.api` (the
one reward shape of sampling, RL and evaluation); `best_of_n_tokens` takes token ids and a
token-level scorer, for rewards that never see text.

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

from posttrain.data.preferences import Prompt
from posttrain.models.backbone import BackboneConfig
from posttrain.rewards.api import RewardFunction, check_rewards, decode_responses, score_responses
from posttrain.sampling.prompting import encode_prompt
from posttrain.sampling.sampler import SampleOutput, SamplingConfig, sample
from posttrain.tokenizer import GemmaTokenizer

Params = dict[str, Any]
# Scores (prompt ids, response ids) pairs, the response cut at its length (stop token kept):
# one float per pair.
TokenScorer = Callable[[Sequence[Sequence[int]], Sequence[Sequence[int]]], Any]


class BestOfNOutput(NamedTuple):
    """The chosen response per prompt and the whole scored pool (b prompts, n samples each)."""

    best_tokens: np.ndarray  # [b, max_new_tokens]
    best_rewards: np.ndarray  # [b] float32
    best_index: np.ndarray  # [b] index in the pool (first maximum on ties)
    pool_tokens: np.ndarray  # [b, n, max_new_tokens]
    pool_rewards: np.ndarray  # [b, n] float32
    pool_lengths: np.ndarray  # [b, n] generated tokens, the stop token included
    pool_model_log_probs: np.ndarray  # [b, n] total log p of each response under the model
    # The texts the reward scored (no stop token, no padding); None from best_of_n_tokens.
    best_responses: list[str] | None = None  # [b]
    pool_responses: list[list[str]] | None = None  # [b][n]


def best_of_n(
    config: BackboneConfig,
    params: Params,
    tokenizer: GemmaTokenizer,
    prompts: Sequence[Prompt],
    n: int,
    reward_fn: RewardFunction,
    sampling: SamplingConfig | None = None,
    rng: jax.Array | None = None,
    *,
    chat: bool = True,
) -> BestOfNOutput:
    """Draw `n` samples per prompt (chat-formatted), score their texts in one call, keep the best.

    `chat=False` encodes string prompts as raw text after <bos> (chat-turn prompts stay chats).
    """
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} pieces but the model only {config.vocab_size}"
        )
    sampling = sampling or SamplingConfig()
    ids = [encode_prompt(tokenizer, prompt, chat) for prompt in prompts]
    out = _draw(config, params, ids, n, sampling, rng)
    texts = decode_responses(tokenizer, out.tokens, out.lengths, sampling.stop_ids)
    rewards = score_responses(reward_fn, [p for p in prompts for _ in range(n)], texts)
    pool = _select(out, rewards, len(prompts), n)
    pool_texts = [texts[i * n : (i + 1) * n] for i in range(len(prompts))]
    return pool._replace(
        best_responses=[pool_texts[i][j] for i, j in enumerate(pool.best_index)],
        pool_responses=pool_texts,
    )


def best_of_n_tokens(
    config: BackboneConfig,
    params: Params,
    prompt_ids: Sequence[Sequence[int]],
    n: int,
    score_tokens: TokenScorer,
    sampling: SamplingConfig | None = None,
    rng: jax.Array | None = None,
) -> BestOfNOutput:
    """Best-of-N on token ids: `score_tokens(prompt_ids, response_ids)` scores the pool."""
    sampling = sampling or SamplingConfig()
    out = _draw(config, params, prompt_ids, n, sampling, rng)
    repeated = [list(prompt) for prompt in prompt_ids for _ in range(n)]
    responses = [row[:length].tolist() for row, length in zip(out.tokens, out.lengths, strict=True)]
    rewards = check_rewards(score_tokens(repeated, responses), len(repeated), score_tokens)
    return _select(out, rewards, len(prompt_ids), n)


def _draw(
    config: BackboneConfig,
    params: Params,
    prompt_ids: Sequence[Sequence[int]],
    n: int,
    sampling: SamplingConfig,
    rng: jax.Array | None,
) -> SampleOutput:
    """n samples of each prompt in one batch, prompt-major ([b * n] rows), as numpy arrays."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    repeated = [list(prompt) for prompt in prompt_ids for _ in range(n)]
    out = sample(config, params, repeated, sampling, rng)
    return SampleOutput(*(np.asarray(field) for field in out))


def _select(out: SampleOutput, rewards: np.ndarray, batch: int, n: int) -> BestOfNOutput:
    """The pool [b, n] of the b * n sampled rows and the first best of each prompt."""
    pool_tokens = out.tokens.reshape(batch, n, -1)
    pool_rewards = rewards.reshape(batch, n)
    best = np.argmax(pool_rewards, axis=1)  # numpy returns the first maximum on ties
    rows = np.arange(batch)
    return BestOfNOutput(
        best_tokens=pool_tokens[rows, best],
        best_rewards=pool_rewards[rows, best],
        best_index=best,
        pool_tokens=pool_tokens,
        pool_rewards=pool_rewards,
        pool_lengths=out.lengths.reshape(batch, n),
        pool_model_log_probs=out.model_log_probs.sum(-1).reshape(batch, n),
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
