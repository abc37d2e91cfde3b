"""The Gemma 1 / Gemma 2 decoder and its three entry points: forward, prefill, decode_step.

The module is Flax linen on purpose: its parameters are a plain nested dict in the official
layout, so a reference policy, an EMA anchor or a weight average is just another tree passed to
the same `apply`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from posttrain.models.attention import Attention, LayerCache
from posttrain.models.cache import DecodeCache, cache_from_prefill, write_positions
from posttrain.models.config import AttentionType, ModelConfig
from posttrain.models.layers import (
    DECODE_WEIGHTS,
    Embedder,
    FeedForward,
    RMSNorm,
    rope_sin_cos,
    soft_cap,
    unembed,
)
from posttrain.sharding import constrain

Array = jax.Array
Params = dict[str, Any]


class Block(nn.Module):
    """Pre-norm residual block; Gemma 2 also normalises each sub-layer's output."""

    config: ModelConfig
    attn_type: AttentionType

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        segment_ids: Array | None,
        cache: LayerCache | None,
        key_positions: Array | None,
        write_slot: Array | None,
        branch_ids: Array | None = None,
        rope: tuple[Array, Array] | None = None,
    ) -> tuple[Array, LayerCache]:
        """Apply the block to x [b, t, d]."""
        cfg = self.config
        norm = dict(eps=cfg.norm_eps, param_dtype=cfg.param_dtype)
        h = RMSNorm(**norm, name="pre_attention_norm")(x)
        attn_out, kv = Attention(cfg, self.attn_type, name="attn")(
            h, positions, segment_ids, cache, key_positions, write_slot, branch_ids, rope
        )
        if cfg.use_post_norms:
            attn_out = RMSNorm(**norm, name="post_attention_norm")(attn_out)
        x = x + attn_out
        h = RMSNorm(**norm, name="pre_ffw_norm")(x)
        mlp_out = FeedForward(cfg.embed_dim, cfg.hidden_dim, cfg.param_dtype, name="mlp")(h)
        if cfg.use_post_norms:
            mlp_out = RMSNorm(**norm, name="post_ffw_norm")(mlp_out)
        x = x + mlp_out
        return constrain(x, ("act_batch", "act_length", "act_embed")), kv


class TransformerOutput(NamedTuple):
    """Logits [b, t, v] in float32 (None when only hidden states were asked for), the final
    normalised hidden states [b, t, d], and per-layer keys/values or the updated cache."""

    logits: Array | None
    hidden: Array
    keys_values: tuple[LayerCache, ...] | DecodeCache


class Transformer(nn.Module):
    """Gemma decoder mapping token ids [b, t] to logits [b, t, v]."""

    config: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        cache: DecodeCache | None = None,
        compute_logits: bool = True,
        branch_ids: Array | None = None,
        position_bound: int | None = None,
    ) -> TransformerOutput:
        """Run the decoder.

        tokens, positions, segment_ids: [b, t] ints. Segment id 0 marks padding; tokens attend
        only within their segment. Without positions, they count up from 0 within each segment.
        With a `cache` (decode mode), t must be 1 and the updated cache is returned.
        `branch_ids` [b, t] (with explicit positions) lays out a shared prefix and several
        continuations of it in one row; see `sequence_mask`.
        `position_bound` promises that explicit positions are all below it, which lets RoPE read
        its sines from a table (`rope_sin_cos`); positions counted here need no promise.
        """
        cfg = self.config
        if branch_ids is not None and (positions is None or cache is not None):
            raise ValueError("branch_ids need explicit positions and work without a cache")
        if positions is None:
            positions = positions_from_segments(
                segment_ids if segment_ids is not None else jnp.ones_like(tokens)
            )
            position_bound = tokens.shape[1]
        embedder = Embedder(
            cfg.num_embed, cfg.vocab_size, cfg.embed_dim, cfg.param_dtype, name="embedder"
        )
        x = embedder.encode(tokens, cfg.dtype)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))

        if cache is not None:
            cache = write_positions(cache, positions)
        rope = rope_sin_cos(positions, position_bound, cfg.head_dim, cfg.rope_base)
        block_cls = nn.remat(Block, static_argnums=()) if cfg.remat else Block
        keys_values = []
        for i, attn_type in enumerate(cfg.layer_types):
            layer_cache = key_positions = write_slot = None
            if cache is not None:
                layer_cache = cache.layers[i]
                key_positions = (
                    cache.local_positions if attn_type == "local" else cache.global_positions
                )
                write_slot = cache.index % key_positions.shape[1]
            x, kv = block_cls(cfg, attn_type, name=f"layer_{i}")(
                x, positions, segment_ids, layer_cache, key_positions, write_slot, branch_ids, rope
            )
            keys_values.append(kv)
        hidden = RMSNorm(cfg.norm_eps, cfg.param_dtype, name="final_norm")(x)
        logits = None
        if compute_logits:
            logits = soft_cap(embedder.decode(hidden), cfg.final_logit_softcap)
            logits = constrain(logits, ("act_batch", "act_length", "act_vocab"))
        if cache is not None:
            new_cache = cache._replace(layers=tuple(keys_values), index=cache.index + 1)
            return TransformerOutput(logits, hidden, new_cache)
        return TransformerOutput(logits, hidden, tuple(keys_values))


def positions_from_segments(segment_ids: Array) -> Array:
    """Positions counting from 0 within each segment; padding (segment 0) gets 0."""
    valid = segment_ids > 0
    index = jnp.arange(segment_ids.shape[1])
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    # Position = time minus the time the current segment started.
    start_time = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return jnp.where(valid, index - start_time, 0).astype(jnp.int32)


def logits_from_hidden(config: ModelConfig, params: Params, hidden: Array) -> Array:
    """Float32 logits for hidden states [..., d] (lets losses chunk the vocabulary projection)."""
    embedding = params["embedder"]["input_embedding"]
    return soft_cap(unembed(embedding, hidden, config.vocab_size), config.final_logit_softcap)


def init_params(config: ModelConfig, rng: Array) -> Params:
    """Random parameters (plain arrays, logical annotations stripped)."""
    return _compiled_init(config)(rng)


@functools.cache
def _compiled_init(config: ModelConfig):
    # One compiled initialiser per config: run eagerly, Flax's init compiles every op separately
    # (seconds per model on CPU).
    def init(rng: Array) -> Params:
        variables = Transformer(config).init(rng, jnp.zeros((1, 1), jnp.int32))
        return nn.unbox(variables["params"])

    return jax.jit(init)


def abstract_params(config: ModelConfig) -> Params:
    """Parameter shapes and dtypes without allocating anything."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def param_logical_axes(config: ModelConfig) -> Params:
    """Tree of logical axis names (PartitionSpec of names) matching the parameter tree."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda: Transformer(config).init(jax.random.key(0), tokens))
    return nn.get_partition_spec(boxed)["params"]


def check_token_ids(tokens: Any, vocab_size: int, where: str) -> None:
    """Raise a ValueError naming the largest id outside [0, vocab_size); tracers pass unchecked."""
    if isinstance(tokens, jax.core.Tracer):
        return
    if isinstance(tokens, jax.Array) and not tokens.is_fully_addressable:
        # Only this process's shards can be read; each process checks its own.
        pieces = [np.asarray(shard.data) for shard in tokens.addressable_shards]
    else:
        pieces = [np.asarray(tokens)]
    pieces = [piece.ravel() for piece in pieces if piece.size]
    if not pieces:
        return
    ids = np.concatenate(pieces)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{where}: token ids must be integers, got dtype {ids.dtype}")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        worst = bad.max() if (bad >= vocab_size).any() else bad.min()
        raise ValueError(
            f"{where}: token id {int(worst)} is out of range for vocab_size={vocab_size} "
            f"(ids must be in [0, {vocab_size}); {bad.size} of {ids.size} ids are outside)"
        )


def forward(
    config: ModelConfig,
    params: Params,
    tokens: Array,
    positions: Array | None = None,
    segment_ids: Array | None = None,
) -> Array:
    """Float32 logits [b, t, v] of the whole sequence; concrete out-of-range ids raise."""
    # An out-of-range id gathers garbage (or NaN) silently; under jit it cannot raise, and a
    # traced array is skipped so the guard adds nothing to the compiled graph.
    check_token_ids(tokens, config.vocab_size, "forward")
    out = Transformer(config).apply({"params": params}, tokens, positions, segment_ids)
    return out.logits


def prefill(
    config: ModelConfig,
    params: Params,
    tokens: Array,
    segment_ids: Array,
    cache_size: int,
    positions: Array | None = None,
) -> tuple[Array, DecodeCache]:
    """Run a (left-padded) prompt [b, t] and return its logits and a cache of `cache_size`."""
    bound = None
    if positions is None:
        positions, bound = positions_from_segments(segment_ids), tokens.shape[1]
    out = Transformer(config).apply(
        {"params": params}, tokens, positions, segment_ids, position_bound=bound
    )
    cache = cache_from_prefill(config, out.keys_values, positions, segment_ids, cache_size)
    return out.logits, cache


def decode_weights(config: ModelConfig, params: Params) -> Params:
    """Every projection weight as the [in, out] matrix a decode step multiplies by.

    Build them once, before a decode loop, and pass them to each `decode_step`: inside the loop
    XLA would otherwise re-lay out the weights on every step (see `layers.DECODE_WEIGHTS`). They
    take as much memory again as the projection weights.
    """
    # A one-token pass records each matrix as it is built; under jit the pass itself is dead code.
    _, variables = Transformer(config).apply(
        {"params": params}, jnp.zeros((1, 1), jnp.int32), mutable=[DECODE_WEIGHTS]
    )
    return variables[DECODE_WEIGHTS]


def decode_step(
    config: ModelConfig,
    params: Params,
    tokens: Array,
    positions: Array,
    cache: DecodeCache,
    weights: Params | None = None,
    position_bound: int | None = None,
) -> tuple[Array, DecodeCache]:
    """Feed one token per row (tokens, positions: [b, 1]); return logits [b, 1, v] and the cache.

    `weights` are optional `decode_weights(config, params)`, built once outside the loop;
    `position_bound` an optional promise that every position is below it (see `Transformer`)."""
    variables = (
        {"params": params} if weights is None else {"params": params, DECODE_WEIGHTS: weights}
    )
    out = Transformer(config).apply(
        variables, tokens, positions, None, cache, position_bound=position_bound
    )
    return out.logits, out.keys_values
