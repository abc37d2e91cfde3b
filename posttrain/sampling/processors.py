"""Logit processing for sampling: temperature, top-k and top-p as traced values.

The settings are arrays, not Python constants, so one compiled sampler serves every setting:
top-k and top-p become thresholds read from one descending sort of the logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

NEG_INF = -jnp.inf


def process_logits(logits: Array, temperature: Array, top_k: Array, top_p: Array) -> Array:
    """Sampling-policy logits [b, v] in float32; masked entries are -inf.

    temperature > 0 divides the logits; top_k <= 0 or >= v disables top-k; top_p >= 1 disables
    top-p. (Greedy decoding, temperature 0, is handled by the caller with an argmax.)
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    safe_temperature = jnp.where(temperature > 0, temperature, 1.0)
    scaled = logits / safe_temperature
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]  # [b, v] descending
    k = jnp.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    kth_largest = jnp.take(ordered, k - 1, axis=-1)[:, None]
    # top-p: keep the smallest prefix of the sorted distribution whose mass reaches p; the
    # token that crosses p is kept. Mass is measured after top-k, as in most samplers.
    ordered = jnp.where(ordered >= kth_largest, ordered, NEG_INF)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    cutoff = jnp.min(jnp.where(keep_sorted, ordered, jnp.inf), axis=-1, keepdims=True)
    threshold = jnp.maximum(kth_largest, cutoff)
    return jnp.where(scaled >= threshold, scaled, NEG_INF)


def token_log_probs(logits: Array, tokens: Array) -> Array:
    """log softmax(logits)[token] in float32 for logits [..., v] and tokens [...]."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]
