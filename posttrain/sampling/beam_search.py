"""Batched beam search with the GNMT length penalty ((5 + L) / 6)^alpha.

Static shapes throughout: alive and finished hypotheses are kept in separate [b, w, ...] arrays
(the T5X design), the loop is a `lax.while_loop`, and the backbone's decoding state is
regathered by beam index every step. Hypotheses that reach the length limit without a stop
token compete with the finished ones, so an exhaustive width returns the exact best sequence of
at most that length.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from posttrain.models import backbone
from posttrain.models.backbone import BackboneConfig
from posttrain.sampling.sampler import DEFAULT_STOP_IDS, bucket_length, left_pad

Array = jax.Array
Params = dict[str, Any]

NEG_INF = -1.0e9  # finite, so that -inf - -inf never makes a NaN in comparisons


class BeamOutput(NamedTuple):
    """Hypotheses per prompt, best first."""

    tokens: Array  # [b, w, max_new_tokens], 0 after the end
    scores: Array  # [b, w] log p / length_penalty
    log_probs: Array  # [b, w] total log p of the hypothesis
    lengths: Array  # [b, w] tokens, the stop token included


def length_penalty(length: Array, alpha: float) -> Array:
    """((5 + L) / 6) ** alpha; alpha = 0 ranks by raw log-probability."""
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


class _BeamState(NamedTuple):
    step: Array
    state: Any  # the backbone's decoding state, [b * w] rows
    logits: Array  # [b * w, v]
    alive_tokens: Array  # [b, w, n]
    alive_log_probs: Array  # [b, w]
    finished_tokens: Array  # [b, w, n]
    finished_scores: Array  # [b, w]
    finished_log_probs: Array  # [b, w]
    finished_lengths: Array  # [b, w]


def _merge_top(scores: Array, k: int, *arrays: Array) -> tuple[Array, ...]:
    """Keep the top-k along axis 1 of `scores` [b, m] and the matching entries of `arrays`."""
    top_scores, index = jax.lax.top_k(scores, k)
    picked = [
        jnp.take_along_axis(a, index.reshape(index.shape + (1,) * (a.ndim - 2)), axis=1)
        for a in arrays
    ]
    return (top_scores, *picked)


@functools.partial(
    jax.jit,
    static_argnames=("config", "width", "max_new_tokens", "stop_ids", "alpha", "early_stop"),
)
def beam_search_tokens(
    config: BackboneConfig,
    params: Params,
    prompt_tokens: Array,
    prompt_segments: Array,
    *,
    width: int,
    max_new_tokens: int,
    stop_ids: tuple[int, ...] = DEFAULT_STOP_IDS,
    alpha: float = 0.6,
    early_stop: bool = True,
) -> BeamOutput:
    """Beam search after left-padded prompts [b, t]."""
    batch, prompt_length = prompt_tokens.shape
    n = max_new_tokens
    logits, decoding = backbone.prefill(
        config, params, prompt_tokens, prompt_segments, prompt_length + n
    )
    weights = backbone.decode_weights(config, params)
    rows = jnp.repeat(jnp.arange(batch), width)
    decoding = backbone.select_rows(config, decoding, rows)
    start_positions = jnp.sum(prompt_segments > 0, axis=1).astype(jnp.int32)
    stop = jnp.asarray(stop_ids, jnp.int32)
    # Only beam 0 starts alive, so the first step does not pick the same token w times.
    alive_log_probs = jnp.where(jnp.arange(width) == 0, 0.0, NEG_INF)[None].repeat(batch, 0)
    empty = jnp.zeros((batch, width, n), jnp.int32)
    state = _BeamState(
        step=jnp.zeros((), jnp.int32),
        state=decoding,
        logits=jnp.take(logits[:, -1], rows, axis=0),
        alive_tokens=empty,
        alive_log_probs=alive_log_probs,
        finished_tokens=empty,
        finished_scores=jnp.full((batch, width), NEG_INF),
        finished_log_probs=jnp.full((batch, width), NEG_INF),
        finished_lengths=jnp.zeros((batch, width), jnp.int32),
    )
    worst_case_penalty = length_penalty(jnp.asarray(n), alpha)

    def keep_going(s: _BeamState) -> Array:
        if not early_stop:
            return s.step < n
        # Log-probs only fall and, for alpha >= 0, the penalty only grows: no alive beam can
        # end above its current log p / penalty(n).
        best_possible = s.alive_log_probs[:, 0] / worst_case_penalty
        worst_kept = s.finished_scores[:, -1]
        return (s.step < n) & ~jnp.all(worst_kept >= best_possible)

    def one_step(s: _BeamState) -> _BeamState:
        vocab = s.logits.shape[-1]
        log_probs = jax.nn.log_softmax(s.logits.astype(jnp.float32), axis=-1)
        candidates = s.alive_log_probs[..., None] + log_probs.reshape(batch, width, vocab)
        candidates = candidates.reshape(batch, width * vocab)
        # (1 + #stop ids) * w candidates always leave w that do not stop.
        keep = min((1 + len(stop_ids)) * width, width * vocab)
        cand_lp, flat = jax.lax.top_k(candidates, keep)
        beam, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        tokens = jnp.take_along_axis(s.alive_tokens, beam[..., None], axis=1)
        tokens = tokens.at[:, :, s.step].set(token)
        stops = jnp.any(token[..., None] == stop, axis=-1)
        length = s.step + 1
        # Finished pool: old finished plus candidates that stopped, or everything at the limit.
        ends = stops | (length == n)
        new_scores = jnp.where(ends, cand_lp / length_penalty(length, alpha), NEG_INF)
        new_scores = jnp.where(cand_lp <= NEG_INF / 2, NEG_INF, new_scores)
        finished = _merge_top(
            jnp.concatenate([s.finished_scores, new_scores], 1),
            width,
            jnp.concatenate([s.finished_tokens, tokens], 1),
            jnp.concatenate([s.finished_log_probs, cand_lp], 1),
            jnp.concatenate([s.finished_lengths, jnp.full(cand_lp.shape, length)], 1),
        )
        # Alive pool: the best w candidates that did not stop.
        alive_lp, alive_tokens, alive_beam, alive_token = _merge_top(
            jnp.where(stops, NEG_INF, cand_lp), width, tokens, beam, token
        )
        source_rows = (jnp.arange(batch)[:, None] * width + alive_beam).reshape(-1)
        decoding = backbone.select_rows(config, s.state, source_rows)
        positions = (start_positions[:, None] + s.step).repeat(width, 1).reshape(-1, 1)
        logits, decoding = backbone.decode_step(
            config, params, alive_token.reshape(-1, 1), positions, decoding, weights
        )
        return _BeamState(
            step=length,
            state=decoding,
            logits=logits[:, 0],
            alive_tokens=alive_tokens,
            alive_log_probs=alive_lp,
            finished_tokens=finished[1],
            finished_scores=finished[0],
            finished_log_probs=finished[2],
            finished_lengths=finished[3],
        )

    final = jax.lax.while_loop(keep_going, one_step, state)
    return BeamOutput(
        final.finished_tokens,
        final.finished_scores,
        final.finished_log_probs,
        final.finished_lengths,
    )


def beam_search(
    config: BackboneConfig,
    params: Params,
    prompts: Sequence[Sequence[int]],
    width: int,
    max_new_tokens: int,
    alpha: float = 0.6,
    stop_ids: tuple[int, ...] = DEFAULT_STOP_IDS,
    early_stop: bool = True,
) -> BeamOutput:
    """Beam search for token-id prompts of any lengths; hypotheses come back best first."""
    if width < 1:
        raise ValueError(f"beam width must be >= 1, got {width}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (the early-stopping bound assumes it), got {alpha}")
    tokens, segments = left_pad(prompts, bucket_length(max(len(p) for p in prompts)))
    return beam_search_tokens(
        config,
        params,
        jnp.asarray(tokens),
        jnp.asarray(segments),
        width=width,
        max_new_tokens=max_new_tokens,
        stop_ids=tuple(stop_ids),
        alpha=alpha,
        early_stop=early_stop,
    )
