"""Multi-head attention for Gemma: MQA, MHA and GQA; global or sliding-window; soft-capped.

Two modes share one set of weights:
* sequence mode (training, scoring, prefill): queries attend within the given tokens, masked by
  causality, segment ids (packing, left padding) and, on local layers, the window;
* decode mode: one new token per row attends to a cache whose slots carry the position of the
  key they hold (-1 for empty or padding). Local layers keep a ring buffer of `window` slots, so
  their cache is O(window), not O(sequence).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from posttrain.models.config import AttentionType, ModelConfig
from posttrain.models.layers import Einsum, apply_rope, rope_tables, soft_cap
from posttrain.sharding import constrain

Array = jax.Array

# Large finite negative rather than -inf: a fully masked row (a padding query) then gives a
# uniform softmax instead of NaN, and its output is ignored anyway.
MASK_VALUE = -2.3819763e38


class LayerCache(NamedTuple):
    """Keys and values of one layer.

    In a decoding cache, keys are [b, k, h, c] and values [b, k, c, h] over c slots: the layouts
    the two per-step products read without a copy (XLA otherwise re-lays out every layer's whole
    cache each step). Sequence mode returns a call's own keys and values as [b, t, k, h].
    """

    keys: Array
    values: Array


def sequence_mask(
    segment_ids: Array,
    window: int | None,
    positions: Array | None = None,
    branch_ids: Array | None = None,
) -> Array:
    """Mask [b, t, s] for attention within a sequence.

    Query i sees key j when j <= i, both are in the same non-padding segment (id > 0), and, with
    a window W, i - j < W (W keys including itself, as in both references).

    With `branch_ids` [b, t] (and `positions`), one row holds a shared prefix (branch 0) followed
    by continuations of it (branches 1, 2, ...): a key is seen from its own branch, or from any
    branch when it is in the prefix, and the window is measured in positions, since each branch's
    positions restart where the prefix ends.
    """
    length = segment_ids.shape[1]
    index = jnp.arange(length)
    allowed = (index[:, None] >= index[None, :])[None]
    if branch_ids is not None:
        key_branch = branch_ids[:, None, :]
        allowed &= (key_branch == 0) | (key_branch == branch_ids[:, :, None])
        if window is not None:
            allowed &= positions[:, :, None] - positions[:, None, :] < window
    elif window is not None:
        allowed &= (index[:, None] - index[None, :] < window)[None]
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    return allowed & same_segment & (segment_ids[:, None, :] > 0)


def cache_mask(query_positions: Array, key_positions: Array, window: int | None) -> Array:
    """Mask [b, t, c] of cache slots for queries at `query_positions` [b, t].

    key_positions [b, c] holds each slot's key position, -1 where the slot is empty or padding.
    """
    q = query_positions[:, :, None]
    k = key_positions[:, None, :]
    allowed = (k >= 0) & (k <= q)
    if window is not None:
        allowed &= k > q - window
    return allowed


class Attention(nn.Module):
    """Gemma self-attention with the official parameter layout."""

    config: ModelConfig
    attn_type: AttentionType

    @property
    def window(self) -> int | None:
        """Sliding window of this layer, None for global layers."""
        return self.config.sliding_window if self.attn_type == "local" else None

    @nn.compact
    def __call__(
        self,
        x: Array,
        positions: Array,
        segment_ids: Array | None = None,
        cache: LayerCache | None = None,
        key_positions: Array | None = None,
        write_slot: Array | None = None,
        branch_ids: Array | None = None,
        rope: tuple[Array, Array] | None = None,
    ) -> tuple[Array, LayerCache]:
        """Attend. Returns the output [b, t, d] and either this call's keys and values
        (sequence mode) or the updated cache (decode mode, when `cache` is given).

        `rope` is (sin, cos) from `rope_sin_cos` when the decoder shares them between layers."""
        cfg = self.config
        n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.embed_dim
        pdt = cfg.param_dtype
        if k == n:
            # The official MHA checkpoints fuse q, k and v in one weight.
            qkv = Einsum((3, n, d, h), (None, "heads", "embed", "head_dim"), pdt, name="qkv_einsum")
            query, key, value = qkv("btd,cndh->cbtnh", x)
        else:
            query = Einsum((n, d, h), ("heads", "embed", "head_dim"), pdt, name="q_einsum")(
                "btd,ndh->btnh", x
            )
            kv = Einsum(
                (2, k, d, h), (None, "kv_heads", "embed", "head_dim"), pdt, name="kv_einsum"
            )
            key, value = kv("btd,ckdh->cbtkh", x)
        query = constrain(query, ("act_batch", "act_length", "act_heads", None))

        sin, cos = rope if rope is not None else rope_tables(positions, h, cfg.rope_base)
        query = apply_rope(query, sin, cos)
        key = apply_rope(key, sin, cos)
        # Scale after RoPE and before q.k, as the reference does.
        query = query * jnp.asarray(cfg.query_scale, query.dtype)

        if cache is None:
            if segment_ids is None:
                segment_ids = jnp.ones(x.shape[:2], jnp.int32)
            mask = sequence_mask(segment_ids, self.window, positions, branch_ids)
            attended_keys, attended_values = key, value
            out_cache = LayerCache(key, value)
        else:
            if x.shape[1] != 1:
                raise ValueError(f"decode mode takes one token per row, got {x.shape[1]}")
            # Writing before attending is safe for one token: the slot it overwrites held the
            # key `window` steps back, which this query no longer sees.
            attended_keys = jax.lax.dynamic_update_slice_in_dim(
                cache.keys, key.astype(cache.keys.dtype).transpose(0, 2, 3, 1), write_slot, axis=3
            )
            attended_values = jax.lax.dynamic_update_slice_in_dim(
                cache.values,
                value.astype(cache.values.dtype).transpose(0, 2, 1, 3),
                write_slot,
                axis=2,
            )
            mask = cache_mask(positions, key_positions, self.window)
            out_cache = LayerCache(attended_keys, attended_values)

        attend = _attend if cache is None else _attend_cached
        encoded = attend(query, attended_keys, attended_values, mask, cfg.attn_logit_softcap)
        encoded = constrain(encoded, ("act_batch", "act_length", "act_heads", None))
        out = Einsum((n, h, d), ("heads", "head_dim", "embed"), pdt, name="attn_vec_einsum")(
            "btnh,nhd->btd", encoded
        )
        return out, out_cache


def _attend(query: Array, keys: Array, values: Array, mask: Array, cap: float | None) -> Array:
    """Softmax attention; q [b, t, n, h], k/v [b, s, k, h], mask [b, t, s] -> [b, t, n, h]."""
    b, t, n, h = query.shape
    s, k = keys.shape[1], keys.shape[2]
    g = n // k
    # Query head i uses kv head i // g: the contiguous grouping of both references. The g query
    # heads of a kv head are stacked along the query axis so both products are plain batched
    # matmuls over (b, k), which XLA runs ~1.5x faster than the 5-d einsum (fwd+bwd, CPU).
    grouped = query.reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, h)
    keys = keys.astype(query.dtype).transpose(0, 2, 1, 3)  # [b, k, s, h]
    values = values.transpose(0, 2, 1, 3)  # [b, k, s, h]
    logits = jnp.einsum("bkqh,bksh->bkqs", grouped, keys, preferred_element_type=jnp.float32)
    logits = soft_cap(logits.reshape(b, k, g, t, s), cap)  # capped before masking
    logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)  # softmax in float32
    encoded = jnp.einsum("bkqs,bksh->bkqh", probs.reshape(b, k, g * t, s), values)
    return (
        encoded.reshape(b, k, g, t, h)
        .transpose(0, 3, 1, 2, 4)
        .reshape(b, t, n, h)
        .astype(query.dtype)
    )


def _attend_cached(
    query: Array, keys: Array, values: Array, mask: Array, cap: float | None
) -> Array:
    """Decoding's single query per row against a cache of keys [b, k, h, c], values [b, k, c, h]."""
    b, _, n, h = query.shape
    k = keys.shape[1]
    grouped = query.reshape(b, k, n // k, h)  # [b, k, g, h]
    logits = jnp.einsum(
        "bkgh,bkhs->bkgs", grouped, keys.astype(query.dtype), preferred_element_type=jnp.float32
    )
    logits = soft_cap(logits, cap)
    logits = jnp.where(mask[:, :, None, :], logits, MASK_VALUE)  # mask [b, 1, s]
    probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
    encoded = jnp.einsum("bkgs,bksh->bkgh", probs, values)
    return encoded.reshape(b, 1, n, h).astype(query.dtype)
