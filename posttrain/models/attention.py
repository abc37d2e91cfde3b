"""Multi-head attention for Gemma: MQA, MHA and GQA; global or sliding-window; soft-capped.

Two modes share one set of weights:
* sequence mode (training, scoring, prefill): queries attend within the given tokens, masked by
  causality, segment ids (packing, left padding) and, on local layers, the window. Where the
  window is small against the row, local layers score each block of queries against the keys
  it can see only (`_attend_local`);
* decode mode: one new token per row attends to a cache whose slots carry the position of the
  key they hold (-1 for empty or padding). Local layers keep a ring buffer of `window` slots, so
  their cache is O(window), not O(sequence).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from posttrain.models.config import AttentionType, ModelConfig
from posttrain.models.layers import Einsum, apply_rope, rope_tables, soft_cap
from posttrain.sharding import constrain

Array = jax.Array

# Decode mode's masked logit. Large finite negative rather than -inf: a fully masked row (a
# padding query) then gives a uniform softmax instead of NaN, and its output is ignored anyway.
# (Sequence mode zeroes masked weights instead; see `_grouped_attention_forward`.)
MASK_VALUE = -2.3819763e38
# Smallest query block of blocked sliding-window attention: smaller per-block products run at
# a fraction of the matmul rate on CPU (8 vs 16 rows measured no faster at window 8).
MIN_LOCAL_BLOCK = 16


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
    meta = _TokenMeta.of_row(segment_ids, positions, branch_ids)
    return _visible(meta, meta, window)


class _TokenMeta(NamedTuple):
    """What the mask needs of each token, [..., t]: row index, segment, position, branch."""

    rows: Array
    segments: Array
    positions: Array | None
    branches: Array | None

    @classmethod
    def of_row(
        cls, segment_ids: Array, positions: Array | None, branch_ids: Array | None
    ) -> _TokenMeta:
        """The tokens of rows [b, t], numbered 0..t-1 along each row."""
        rows = jnp.broadcast_to(jnp.arange(segment_ids.shape[1]), segment_ids.shape)
        return cls(rows, segment_ids, positions, branch_ids)


def _visible(queries: _TokenMeta, keys: _TokenMeta, window: int | None) -> Array:
    """Mask [..., t, s]: which keys each query sees (the rule of `sequence_mask`)."""

    def pair(field: str) -> tuple[Array, Array]:
        return getattr(queries, field)[..., :, None], getattr(keys, field)[..., None, :]

    query_row, key_row = pair("rows")
    query_segment, key_segment = pair("segments")
    allowed = (key_row <= query_row) & (key_segment == query_segment) & (key_segment > 0)
    if queries.branches is not None:
        query_branch, key_branch = pair("branches")
        allowed &= (key_branch == 0) | (key_branch == query_branch)
        if window is not None:
            query_position, key_position = pair("positions")
            allowed &= query_position - key_position < window
    elif window is not None:
        allowed &= query_row - key_row < window
    return allowed


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

        cap = cfg.attn_logit_softcap
        if cache is None:
            if segment_ids is None:
                segment_ids = jnp.ones(x.shape[:2], jnp.int32)
            block = local_block(self.window, x.shape[1], branch_ids)
            if block is None:
                mask = sequence_mask(segment_ids, self.window, positions, branch_ids)
                encoded = _attend(query, key, value, mask, cap)
            else:
                meta = _TokenMeta.of_row(segment_ids, positions, branch_ids)
                encoded = _attend_local(query, key, value, cap, self.window, meta, block)
            out_cache = LayerCache(key, value)
        else:
            if x.shape[1] != 1:
                raise ValueError(f"decode mode takes one token per row, got {x.shape[1]}")
            # Writing before attending is safe for one token: the slot it overwrites held the
            # key `window` steps back, which this query no longer sees.
            keys = jax.lax.dynamic_update_slice_in_dim(
                cache.keys, key.astype(cache.keys.dtype).transpose(0, 2, 3, 1), write_slot, axis=3
            )
            values = jax.lax.dynamic_update_slice_in_dim(
                cache.values,
                value.astype(cache.values.dtype).transpose(0, 2, 1, 3),
                write_slot,
                axis=2,
            )
            mask = cache_mask(positions, key_positions, self.window)
            encoded = _attend_cached(query, keys, values, mask, cap)
            out_cache = LayerCache(keys, values)
        encoded = constrain(encoded, ("act_batch", "act_length", "act_heads", None))
        out = Einsum((n, h, d), ("heads", "head_dim", "embed"), pdt, name="attn_vec_einsum")(
            "btnh,nhd->btd", encoded
        )
        return out, out_cache


def _attend(query: Array, keys: Array, values: Array, mask: Array, cap: float | None) -> Array:
    """Softmax attention; q [b, t, n, h], k/v [b, s, k, h], mask [b, t, s] -> [b, t, n, h]."""
    b, t, n, h = query.shape
    k = keys.shape[2]
    g = n // k
    # Query head i uses kv head i // g: the contiguous grouping of both references. The g query
    # heads of a kv head are stacked along the query axis so both products are plain batched
    # matmuls over (b, k), which XLA runs ~1.5x faster than the 5-d einsum (fwd+bwd, CPU).
    grouped = query.reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, h)
    keys = keys.astype(query.dtype).transpose(0, 2, 1, 3)  # [b, k, s, h]
    values = values.transpose(0, 2, 1, 3)  # [b, k, s, h]
    encoded = _grouped_attention(grouped, keys, values, mask, cap)
    return (
        encoded.reshape(b, k, g, t, h)
        .transpose(0, 3, 1, 2, 4)
        .reshape(b, t, n, h)
        .astype(query.dtype)
    )


def local_block(window: int | None, length: int, branch_ids: Array | None) -> int | None:
    """Query block for `_attend_local` on a window layer, or None where full scores are cheaper.

    Blocks of at least 16 rows keep the per-block products from being too small to run well.
    Blocking is used when a block's keys are at most half the row, so that the scores it saves
    clearly outweigh gathering the bands (at Gemma 2's window of 4096, rows of 16k tokens).
    """
    if window is None:
        return None
    block = max(window, MIN_LOCAL_BLOCK)
    keys = 2 * block + (window if branch_ids is not None else 0)
    return block if 2 * keys <= length else None


def _attend_local(
    query: Array,
    keys: Array,
    values: Array,
    cap: float | None,
    window: int,
    meta: _TokenMeta,
    block: int,
) -> Array:
    """Sliding-window attention over blocks: O(t * block) scores instead of O(t^2).

    Queries go in blocks of `block` >= `window` rows; block i attends to rows [(i-1) * block,
    (i+1) * block), which hold every key its queries see. With branches (shared-prefix rows),
    the first `window` - 1 tokens of a continuation also see the end of the prefix, which may lie
    far back in the row, so every block also attends to the `window` rows before the prefix ends
    (masked where they repeat a key of the block's own band). Same result as `_attend` with the
    `sequence_mask` of `meta`.
    """
    b, t, n, h = query.shape
    count = -(-t // block)
    end_pad = count * block - t

    def band(x: Array, fill: int) -> Array:
        """[b, t, ...] -> [b, count, 2 * block, ...]: each block's previous and own rows."""
        widths = [(0, 0), (block, end_pad)] + [(0, 0)] * (x.ndim - 2)
        blocks = jnp.pad(x, widths, constant_values=fill)
        blocks = blocks.reshape(b, count + 1, block, *x.shape[2:])
        return jnp.concatenate([blocks[:, :-1], blocks[:, 1:]], axis=2)

    def own(x: Array) -> Array:
        """[b, t, ...] -> [b, count, block, ...]."""
        widths = [(0, 0), (0, end_pad)] + [(0, 0)] * (x.ndim - 2)
        return jnp.pad(x, widths).reshape(b, count, block, *x.shape[2:])

    # Padding rows get segment 0, as queries and as keys: they see nothing and nothing sees them.
    query_meta = _TokenMeta(
        own(meta.rows),
        own(meta.segments),
        None if meta.positions is None else own(meta.positions),
        None if meta.branches is None else own(meta.branches),
    )
    key_meta = _TokenMeta(
        band(meta.rows, 0),
        band(meta.segments, 0),
        None if meta.positions is None else band(meta.positions, 0),
        None if meta.branches is None else band(meta.branches, 0),
    )
    band_keys, band_values = band(keys, 0), band(values, 0)

    if meta.branches is not None:
        in_prefix = (meta.branches == 0) & (meta.segments > 0)
        prefix_end = jnp.max(jnp.where(in_prefix, meta.rows + 1, 0), axis=1)
        tail = prefix_end[:, None] - window + jnp.arange(window)  # [b, window]
        safe_tail = jnp.clip(tail, 0, t - 1)

        def take(x: Array) -> Array:
            """Rows `tail` of x [b, t, ...], repeated for every block: [b, count, window, ...]."""
            index = safe_tail.reshape(b, window, *([1] * (x.ndim - 2)))
            picked = jnp.take_along_axis(x, index, axis=1)
            return jnp.broadcast_to(picked[:, None], (b, count, *picked.shape[1:]))

        block_start = (jnp.arange(count) * block)[None, :, None]
        repeats = (tail[:, None] >= block_start - block) & (tail[:, None] < block_start + block)
        usable = (tail[:, None] >= 0) & ~repeats
        tail_meta = _TokenMeta(
            take(meta.rows),
            jnp.where(usable, take(meta.segments), 0),
            take(meta.positions),
            take(meta.branches),
        )
        key_meta = _TokenMeta(
            *(jnp.concatenate(pair, axis=2) for pair in zip(key_meta, tail_meta, strict=True))
        )
        band_keys = jnp.concatenate([band_keys, take(keys)], axis=2)
        band_values = jnp.concatenate([band_values, take(values)], axis=2)

    mask = _visible(query_meta, key_meta, window)  # [b, count, block, keys per block]
    width = mask.shape[-1]
    encoded = _attend(
        own(query).reshape(b * count, block, n, h),
        band_keys.reshape(b * count, width, *keys.shape[2:]),
        band_values.reshape(b * count, width, *values.shape[2:]),
        mask.reshape(b * count, block, width),
        cap,
    )
    return encoded.reshape(b, count * block, n, h)[:, :t]


def _exp_needs_shift(cap: float | None, keys: int) -> bool:
    """Whether exp of the logits must be shifted by their max to stay finite in float32.

    A soft cap bounds the logits to [-cap, cap]: for Gemma 2's cap of 50, exp of every logit
    and the sum over the keys are finite and above float32's smallest normal, so the max (one
    more pass over the scores, forward) is not needed.
    """
    return cap is None or cap + math.log(keys) > 80.0


def _grouped_attention_forward(
    query: Array, keys: Array, values: Array, mask: Array, cap: float | None
) -> tuple[Array, tuple[Array, Array | None]]:
    """Output [b, k, q, h] and the probabilities [b, k, q, s] (and tanh of the capped logits)."""
    b, k, gt, _ = query.shape
    s, t = keys.shape[2], mask.shape[1]
    logits = jnp.einsum("bkqh,bksh->bkqs", query, keys, preferred_element_type=jnp.float32)
    logits = logits.reshape(b, k, gt // t, t, s)
    visible = mask[:, None, None]
    tanh = None
    if cap is not None:
        tanh = jnp.tanh(logits / cap)
        logits = cap * tanh
    if _exp_needs_shift(cap, s):
        logits = logits - jnp.max(jnp.where(visible, logits, -jnp.inf), -1, keepdims=True)
    weights = jnp.where(visible, jnp.exp(logits), 0.0)
    # A fully masked row (a padding query) has no weight; its output is 0 and ignored.
    total = jnp.maximum(jnp.sum(weights, -1, keepdims=True), jnp.finfo(jnp.float32).tiny)
    probs = (weights / total).reshape(b, k, gt, s)
    encoded = jnp.einsum("bkqs,bksh->bkqh", probs.astype(values.dtype), values)
    return encoded, (probs, tanh)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _grouped_attention(
    query: Array, keys: Array, values: Array, mask: Array, cap: float | None
) -> Array:
    """softmax(soft_cap(q k^T) | mask) v; q [b, k, g*t, h], k/v [b, k, s, h], mask [b, t, s].

    The gradient is written out (below) rather than derived: XLA:CPU ran the derived one's
    key-gradient product outside its fast matmul path, and its softmax backward reduces over
    the [q, s] scores where sum_s(p * dp) = sum_h(dO * O) reduces over the head dimension.
    """
    return _grouped_attention_forward(query, keys, values, mask, cap)[0]


def _grouped_attention_fwd(query, keys, values, mask, cap):
    encoded, (probs, tanh) = _grouped_attention_forward(query, keys, values, mask, cap)
    return encoded, (query, keys, values, probs, tanh, encoded)


def _grouped_attention_bwd(cap, residuals, d_encoded):
    query, keys, values, probs, tanh, encoded = residuals
    d_probs = jnp.einsum("bkqh,bksh->bkqs", d_encoded, values, preferred_element_type=jnp.float32)
    row_dot = jnp.sum(
        d_encoded.astype(jnp.float32) * encoded.astype(jnp.float32), -1, keepdims=True
    )
    d_logits = probs * (d_probs - row_dot)
    if tanh is not None:
        d_logits = (d_logits.reshape(tanh.shape) * (1.0 - tanh * tanh)).reshape(probs.shape)
    d_logits = d_logits.astype(query.dtype)
    d_query = jnp.einsum("bkqs,bksh->bkqh", d_logits, keys)
    # The weight gradients contract the query axis. XLA:CPU sends a product to its fast matmul
    # path when the left operand contracts its minor axis, and it folds a plain transpose back
    # into the product; the barrier keeps the transposed copies.
    d_logits_t, probs_t = jax.lax.optimization_barrier(
        (d_logits.swapaxes(-1, -2), probs.astype(d_encoded.dtype).swapaxes(-1, -2))
    )
    d_keys = jnp.einsum("bksq,bkqh->bksh", d_logits_t, query)
    d_values = jnp.einsum("bksq,bkqh->bksh", probs_t, d_encoded)
    return (
        d_query.astype(query.dtype),
        d_keys.astype(keys.dtype),
        d_values.astype(values.dtype),
        None,
    )


_grouped_attention.defvjp(_grouped_attention_fwd, _grouped_attention_bwd)


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
