"""Logit processing for sampling: temperature, top-k and top-p as traced values.

The settings are arrays, not Python constants, so one compiled sampler serves every setting.
Top-k and top-p are thresholds found by bisection over the order-preserving integer image of
the float32 logits: 32 vectorised counting passes give the exact threshold a full sort would,
and XLA's CPU sort of a [b, v] array cost more than the whole model step it served.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

NEG_INF = -jnp.inf


def _sortable_keys(x: Array) -> Array:
    """int32 keys with key(a) < key(b) exactly when a < b, for float32 (not NaN) values."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits >= 0, bits, bits ^ jnp.int32(0x7FFFFFFF))


def _largest_key_with(keys: Array, enough: Callable[[Array], Array]) -> Array:
    """Per row, the largest key k with enough(keys >= k) True ([b, 1]); enough is monotone."""
    low = jnp.full((*keys.shape[:-1], 1), jnp.iinfo(jnp.int32).min, jnp.int32)  # always enough
    high = jnp.full_like(low, jnp.iinfo(jnp.int32).max)

    def halve(_: int, bounds: tuple[Array, Array]) -> tuple[Array, Array]:
        low, high = bounds
        # floor((low + high + 1) / 2) without int32 overflow; the loop keeps enough(low) true.
        mid = (low >> 1) + (high >> 1) + (((low & 1) + (high & 1) + 1) >> 1)
        ok = enough(keys >= mid)
        return jnp.where(ok, mid, low), jnp.where(ok, high, mid - 1)

    low, _ = jax.lax.fori_loop(0, 32, halve, (low, high))
    return low


def _filter(scaled: Array, top_k: Array, top_p: Array) -> Array:
    """Mask (to -inf) what top-k, then top-p over the renormalised rest, removes."""
    keys = _sortable_keys(scaled)
    k = jnp.where((top_k <= 0) | (top_k > scaled.shape[-1]), scaled.shape[-1], top_k)
    kth = _largest_key_with(keys, lambda kept: jnp.sum(kept, -1, keepdims=True) >= k)
    scaled = jnp.where(keys >= kth, scaled, NEG_INF)
    probs = jax.nn.softmax(scaled, axis=-1)
    # Keep the smallest set of most likely tokens whose mass reaches p: the threshold is the
    # largest one whose kept mass is still >= p (the token crossing p is kept).
    target = jnp.minimum(top_p, jnp.sum(probs, -1, keepdims=True))
    cutoff = _largest_key_with(
        keys, lambda kept: jnp.sum(jnp.where(kept, probs, 0.0), -1, keepdims=True) >= target
    )
    return jnp.where(keys >= cutoff, scaled, NEG_INF)


def process_logits(logits: Array, temperature: Array, top_k: Array, top_p: Array) -> Array:
    """Sampling-policy logits [b, v] in float32; masked entries are -inf.

    temperature > 0 divides the logits; top_k <= 0 or >= v disables top-k; top_p >= 1 disables
    top-p. (Greedy decoding, temperature 0, is handled by the caller with an argmax.)
    """
    logits = logits.astype(jnp.float32)
    safe_temperature = jnp.where(temperature > 0, temperature, 1.0)
    scaled = logits / safe_temperature
    filtering = ((top_k > 0) & (top_k < logits.shape[-1])) | (top_p < 1.0)
    # Only pay for the bisection when a filter is on; both branches compile once.
    return jax.lax.cond(filtering, _filter, lambda s, k, p: s, scaled, top_k, top_p)


def token_log_probs(logits: Array, tokens: Array) -> Array:
    """log softmax(logits)[token] in float32 for logits [..., v] and tokens [...]."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]


def first_argmax(x: Array) -> Array:
    """Index of the first maximum along the last axis, as `jnp.argmax` (NaN aside).

    A max and a min of indices: two plain reductions, where XLA:CPU's (value, index) pair
    reduction of `argmax` ran unvectorised (an eighth of a B=64 decode step).
    """
    best = jnp.max(x, axis=-1, keepdims=True)
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    first = jnp.min(jnp.where(x == best, index, x.shape[-1]), axis=-1)
    return jnp.minimum(first, x.shape[-1] - 1)  # all-NaN rows: the last index, never out of range
