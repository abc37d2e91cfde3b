"""Token log-probabilities from hidden states, with the vocabulary projected in chunks.

A 256k-vocabulary model would otherwise materialise float32 logits of [tokens, 256000] (and
keep them for the backward pass). Here the vocabulary is swept in chunks with a running
log-sum-exp; each chunk's logits are recomputed in the backward pass (`jax.checkpoint`), so
peak memory is O(tokens x chunk). Log-softmax is float32 throughout: bf16 log-probs of large
vocabularies are too coarse for the KL estimates of RL.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from posttrain.models import backbone
from posttrain.models.backbone import BackboneConfig

Array = jax.Array
Params = dict[str, Any]


def chunked_token_log_probs(
    hidden: Array,
    embedding: Array,
    targets: Array,
    vocab_size: int,
    softcap: float | None = None,
    chunk_size: int = 8192,
) -> Array:
    """log softmax(cap(hidden @ E[:v].T))[target] for hidden [n, d], targets [n] -> [n] float32."""
    chunk_size = min(chunk_size, vocab_size)
    chunks = -(-vocab_size // chunk_size)
    rows = hidden.shape[0]

    @jax.checkpoint  # keep only the running statistics; recompute each chunk's logits
    def sweep(carry: tuple[Array, Array, Array], nominal_start: Array):
        running_max, running_sum, target_logit = carry
        # Slice the table in place (no padded copy of a 256k x d embedding); the last chunk is
        # shifted back to fit and its columns already seen are masked out.
        start = jnp.minimum(nominal_start, vocab_size - chunk_size)
        weights = jax.lax.dynamic_slice_in_dim(embedding, start, chunk_size).astype(hidden.dtype)
        logits = jnp.einsum("nd,kd->nk", hidden, weights, preferred_element_type=jnp.float32)
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        column = start + jnp.arange(chunk_size)
        fresh = column[None, :] >= nominal_start
        logits = jnp.where(fresh, logits, -jnp.inf)
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
        running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(
            jnp.exp(logits - new_max[:, None]), axis=-1
        )
        hit = fresh & (column[None, :] == targets[:, None])
        target_logit = target_logit + jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
        return (new_max, running_sum, target_logit), None

    init = (
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    starts = jnp.arange(chunks) * chunk_size
    (running_max, running_sum, target_logit), _ = jax.lax.scan(sweep, init, starts)
    return target_logit - (running_max + jnp.log(running_sum))


@functools.partial(jax.jit, static_argnames=("config", "chunk_size"))
def sequence_token_log_probs(
    config: BackboneConfig,
    params: Params,
    inputs: Array,
    targets: Array,
    segment_ids: Array | None = None,
    chunk_size: int = 8192,
) -> Array:
    """log p(targets[:, i] | inputs[:, :i+1]) for inputs and targets [b, t] -> [b, t] float32.

    For next-token prediction pass inputs = tokens[:, :-1] and targets = tokens[:, 1:].
    """
    hidden = backbone.hidden_states(config, params, inputs, None, segment_ids)
    embedding, softcap = backbone.unembedding(config, params)
    b, t, d = hidden.shape
    log_probs = chunked_token_log_probs(
        hidden.reshape(b * t, d),
        embedding,
        targets.reshape(-1),
        config.vocab_size,
        softcap,
        min(chunk_size, config.vocab_size),
    )
    return log_probs.reshape(b, t)
