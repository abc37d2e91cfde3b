"""The decoding cache: per-layer keys and values in slots, plus the position held by each slot.

Global layers get `cache_size` slots; local layers a ring buffer of min(window, cache_size)
slots, written at `time % slots`. One document per row (left padding allowed): `index` is the
time step shared by all rows, positions are per row and padding-aware.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from posttrain.models.attention import LayerCache
from posttrain.models.config import AttentionType, ModelConfig

Array = jax.Array


class DecodeCache(NamedTuple):
    """Everything decoding needs to continue a batch of sequences."""

    layers: tuple[LayerCache, ...]
    global_positions: Array  # [b, cache_size]; -1 marks an empty or padding slot
    local_positions: Array  # [b, min(window, cache_size)]
    index: Array  # scalar int32: the time step the next token is written at


def slot_count(config: ModelConfig, attn_type: AttentionType, cache_size: int) -> int:
    """Number of cache slots of a layer of this type."""
    if attn_type == "local":
        return min(config.sliding_window, cache_size)
    return cache_size


def init_cache(
    config: ModelConfig, batch: int, cache_size: int, dtype: str | None = None
) -> DecodeCache:
    """An empty cache for `batch` rows and up to `cache_size` tokens."""
    dtype = dtype or config.dtype
    k, h = config.num_kv_heads, config.head_dim
    layers = []
    for attn_type in config.layer_types:
        slots = slot_count(config, attn_type, cache_size)
        layers.append(
            LayerCache(
                jnp.zeros((batch, k, h, slots), dtype), jnp.zeros((batch, k, slots, h), dtype)
            )
        )
    return DecodeCache(
        layers=tuple(layers),
        global_positions=jnp.full((batch, cache_size), -1, jnp.int32),
        local_positions=jnp.full((batch, slot_count(config, "local", cache_size)), -1, jnp.int32)
        if config.sliding_window
        else jnp.zeros((batch, 0), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def _ring_fill(values: Array, slots: int, fill: float | int) -> Array:
    """Place a sequence [b, t, ...] into `slots` ring slots: slot s holds the last t' = s mod slots."""
    length = values.shape[1]
    slot = jnp.arange(slots)
    last_time = ((length - 1 - slot) // slots) * slots + slot  # newest time written to the slot
    present = slot <= length - 1
    gathered = jnp.take(values, jnp.clip(last_time, 0, length - 1), axis=1)
    present = present.reshape((1, slots) + (1,) * (values.ndim - 2))
    return jnp.where(present, gathered, jnp.asarray(fill, values.dtype))


def cache_from_prefill(
    config: ModelConfig,
    keys_values: tuple[LayerCache, ...],
    positions: Array,
    segment_ids: Array,
    cache_size: int,
) -> DecodeCache:
    """Build the cache from a prefill's keys and values ([b, t, k, h] per layer)."""
    length = positions.shape[1]
    if length > cache_size:
        raise ValueError(f"prompt of {length} tokens does not fit a cache of {cache_size}")
    key_positions = jnp.where(segment_ids > 0, positions, -1).astype(jnp.int32)
    layers = []
    for attn_type, kv in zip(config.layer_types, keys_values, strict=True):
        slots = slot_count(config, attn_type, cache_size)
        keys = _ring_fill(kv.keys, slots, 0).transpose(0, 2, 3, 1)  # [b, k, h, slots]
        values = _ring_fill(kv.values, slots, 0).transpose(0, 2, 1, 3)  # [b, k, slots, h]
        layers.append(LayerCache(keys, values))
    local_slots = slot_count(config, "local", cache_size) if config.sliding_window else 0
    return DecodeCache(
        layers=tuple(layers),
        global_positions=_ring_fill(key_positions, cache_size, -1),
        local_positions=_ring_fill(key_positions, local_slots, -1)
        if local_slots
        else jnp.zeros((positions.shape[0], 0), jnp.int32),
        index=jnp.asarray(length, jnp.int32),
    )


def write_positions(cache: DecodeCache, positions: Array) -> DecodeCache:
    """Record the positions [b, 1] of the token about to be written at `cache.index`."""
    global_slots = cache.global_positions.shape[1]
    global_positions = jax.lax.dynamic_update_slice_in_dim(
        cache.global_positions, positions.astype(jnp.int32), cache.index % global_slots, axis=1
    )
    local_positions = cache.local_positions
    if local_positions.shape[1]:
        local_positions = jax.lax.dynamic_update_slice_in_dim(
            local_positions,
            positions.astype(jnp.int32),
            cache.index % local_positions.shape[1],
            axis=1,
        )
    return cache._replace(global_positions=global_positions, local_positions=local_positions)


def select_rows(cache: DecodeCache, rows: Array) -> DecodeCache:
    """A cache whose row i is row `rows[i]` of this one (beam reordering, replication)."""
    take = lambda x: jnp.take(x, rows, axis=0)  # noqa: E731
    return cache._replace(
        layers=tuple(LayerCache(take(layer.keys), take(layer.values)) for layer in cache.layers),
        global_positions=take(cache.global_positions),
        local_positions=take(cache.local_positions),
    )


def repeat_cache_rows(cache: DecodeCache, repeats: int) -> DecodeCache:
    """Each row's cache `repeats` times in a row ([b, ...] -> [b·repeats, ...]): k samples of one
    prompt continue from one prefill."""
    if repeats == 1:
        return cache

    def repeat(x: Array) -> Array:
        return jnp.repeat(x, repeats, axis=0)

    return DecodeCache(
        layers=tuple(LayerCache(*(repeat(x) for x in layer)) for layer in cache.layers),
        global_positions=repeat(cache.global_positions),
        local_positions=repeat(cache.local_positions),
        index=cache.index,
    )
