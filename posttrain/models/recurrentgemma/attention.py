"""Griffin's local multi-query attention: RoPE on the first half of each head, a sliding window,
and in decode mode a ring buffer of `attention_window` slots.

The window trap (`shared/design/backbone.md` §2.4): the deepmind code lets a query see itself
and the W keys before it (W + 1 keys, 2049 for the 2B model), transformers W keys including
itself. `RecurrentGemmaConfig.visible_keys` holds the count for the configured semantics; every
mode masks by it, so the ring buffer's W slots serve either.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from posttrain.models.layers import apply_rope, rope_tables
from posttrain.models.recurrentgemma.layers import Dense, TokenMeta
from posttrain.sharding import constrain

Array = jax.Array

# Masked logit: large and finite, so a query that sees nothing (never a real token: each sees
# itself) gives a uniform softmax instead of NaN.
MASK_VALUE = -2.3819763e38
# Smallest query block of the banded sequence attention (smaller products run slowly on CPU).
MIN_BLOCK = 16


class AttentionState(NamedTuple):
    """Decoding state of one attention block: keys and values [b, w, h] in w ring slots.

    Slot s holds the token written at a time step congruent to s modulo w; the positions of the
    keys are shared by all attention layers (`RecurrentGemmaState.key_positions`)."""

    keys: Array
    values: Array


def band_block(visible: int, length: int) -> int | None:
    """Query block of the banded attention, or None where one full [t, t] score matrix is
    cheaper. A block b >= visible - 1 lets each block of queries find every key it sees in its
    own and the previous block; banding pays once the row holds at least four blocks."""
    block = max(-(-(visible - 1) // MIN_BLOCK) * MIN_BLOCK, MIN_BLOCK)
    return block if length >= 4 * block else None


def _visible(q_rows: Array, q_docs: Array, k_rows: Array, k_docs: Array, visible: int) -> Array:
    """[..., t, s]: key s is in query t's document, not after it, and within the window."""
    distance = q_rows[..., :, None] - k_rows[..., None, :]
    same = q_docs[..., :, None] == k_docs[..., None, :]
    return same & (distance >= 0) & (distance < visible)


def _attend(query: Array, keys: Array, values: Array, mask: Array) -> Array:
    """q [b, t, n, h] (already scaled), k/v [b, s, h], mask [b, t, s] -> [b, t, n, h]."""
    logits = jnp.einsum("btnh,bsh->btns", query, keys, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, :, None, :], logits, MASK_VALUE)
    # Softmax in float32, as the reference does: bf16 sums over 2k keys lose the small weights.
    probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
    return jnp.einsum("btns,bsh->btnh", probs, values).astype(query.dtype)


def sequence_attention(
    query: Array, keys: Array, values: Array, docs: Array, visible: int, block: int | None
) -> Array:
    """Causal windowed attention within documents over whole rows.

    q [b, t, n, h], k/v [b, t, h], docs [b, t]. With `block`, queries go in blocks that score
    only their own and the previous block's keys: O(t * block) instead of O(t^2).
    """
    b, t, n, h = query.shape
    rows = jnp.broadcast_to(jnp.arange(t), (b, t))
    if block is None:
        return _attend(query, keys, values, _visible(rows, docs, rows, docs, visible))
    count = -(-t // block)
    pad = count * block - t

    def blocks(x: Array, fill: int | float) -> Array:  # [b, t, ...] -> [b, count, block, ...]
        widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
        return jnp.pad(x, widths, constant_values=fill).reshape(b, count, block, *x.shape[2:])

    def band(x: Array, fill: int | float) -> Array:  # [b, count, 2 * block, ...]
        x = blocks(x, fill)
        before = jnp.pad(
            x[:, :-1], [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2), constant_values=fill
        )
        return jnp.concatenate([before, x], axis=2)

    # Rows outside [0, t) get document -1: no query of the row shares it.
    mask = _visible(blocks(rows, t), blocks(docs, -2), band(rows, -1), band(docs, -1), visible)
    encoded = _attend(
        blocks(query, 0).reshape(b * count, block, n, h),
        band(keys, 0).reshape(b * count, 2 * block, h),
        band(values, 0).reshape(b * count, 2 * block, h),
        mask.reshape(b * count, block, 2 * block),
    )
    return encoded.reshape(b, count * block, n, h)[:, :t]


def _extend_attention(
    query: Array,
    keys: Array,
    values: Array,
    meta: TokenMeta,
    state: AttentionState,
    key_positions: Array,
    visible: int,
) -> Array:
    """q [b, t, n, h], k/v [b, t, h] of tokens continuing `state`'s rows -> [b, t, n, h].

    A query sees the cached keys of the document it continues (document 0: before any start in
    the block) within the window, measured in positions as decode mode does, then the block's
    own keys causally within its document. w slots suffice: the first query sees at most the
    w tokens before it, the only ones a `visible` of w + 1 reaches back to.
    """
    b, t = meta.positions.shape
    distance = meta.positions[:, :, None] - key_positions[:, None, :]  # [b, t, w]
    cached = (
        (meta.docs == 0)[:, :, None]
        & (key_positions >= 0)[:, None, :]
        & (distance > 0)
        & (distance < visible)
    )
    rows = jnp.broadcast_to(jnp.arange(t), (b, t))
    own = _visible(rows, meta.docs, rows, meta.docs, visible)  # [b, t, t]
    return _attend(
        query,
        jnp.concatenate([state.keys.astype(keys.dtype), keys], axis=1),
        jnp.concatenate([state.values.astype(values.dtype), values], axis=1),
        jnp.concatenate([cached, own], axis=2),
    )


def ring_fill(x: Array, slots: int, fill: int | float) -> Array:
    """Place a sequence [b, t, ...] in `slots` ring slots: slot s holds the newest time t' < t
    with t' = s (mod slots), or `fill` where none exists."""
    length = x.shape[1]
    slot = jnp.arange(slots)
    newest = ((length - 1 - slot) // slots) * slots + slot
    present = (slot < length).reshape((1, slots) + (1,) * (x.ndim - 2))
    return jnp.where(present, jnp.take(x, jnp.clip(newest, 0, length - 1), axis=1), fill)


class LocalAttentionBlock(nn.Module):
    """Multi-query local attention with the official parameter layout (`proj_q`, `proj_k`,
    `proj_v`, and `proj_final` with a bias)."""

    width: int  # d
    num_heads: int  # n
    window: int  # w: ring slots in decode mode
    visible: int  # keys a query sees, itself included
    rotary_dim: int  # r
    rope_base: float = 10_000.0
    out_init_scale: float = 1.0
    param_dtype: str = "float32"

    @nn.compact
    def __call__(
        self,
        x: Array,
        meta: TokenMeta,
        state: AttentionState | None,
        key_positions: Array | None = None,
        write_slot: Array | None = None,
    ) -> tuple[Array, AttentionState]:
        """Attend over x [b, t, d].

        Sequence mode (no state): within the given rows; returns the last w keys and values as
        ring slots. Decode mode: one token per row against `state`, whose slots hold keys at
        `key_positions` [b, w] (-1: empty); the new key is written at `write_slot`. Extend mode
        (a state, no write slot): t tokens continuing the state's rows, which see its slots and
        each other; the state is read, not written (a fork of a prefill), and returned as is.
        """
        b, t, _ = x.shape
        n, h, pdt = self.num_heads, self.width // self.num_heads, self.param_dtype
        query = Dense(n * h, ("embed", "heads"), use_bias=False, param_dtype=pdt, name="proj_q")(x)
        key = Dense(h, ("embed", "head_dim"), use_bias=False, param_dtype=pdt, name="proj_k")(x)
        value = Dense(h, ("embed", "head_dim"), use_bias=False, param_dtype=pdt, name="proj_v")(x)
        query = constrain(query.reshape(b, t, n, h), ("act_batch", "act_length", "act_heads", None))
        query, key = self._rope(query, meta.positions), self._rope(key[:, :, None], meta.positions)
        key = key[:, :, 0]
        # The reference scales the logits by h^-0.5; scaling q first is the same product (exact
        # in any dtype for h = 256, where the factor is 1/16).
        query = query * jnp.asarray(h**-0.5, query.dtype)

        if state is None:
            block = band_block(self.visible, t)
            encoded = sequence_attention(query, key, value, meta.docs, self.visible, block)
            new_state = AttentionState(
                ring_fill(key, self.window, 0), ring_fill(value, self.window, 0)
            )
        elif write_slot is None:
            encoded = _extend_attention(query, key, value, meta, state, key_positions, self.visible)
            new_state = state
        else:
            if t != 1:
                raise ValueError(f"decode mode takes one token per row, got {t}")
            position = meta.positions  # [b, 1]
            distance = position - key_positions  # [b, w]
            # Slots of earlier tokens of this document within the window; the new token itself
            # is appended (so a new document, at position 0, sees only itself).
            seen = (key_positions >= 0) & (distance > 0) & (distance < self.visible)
            mask = jnp.concatenate([seen, jnp.ones((b, 1), bool)], axis=1)[:, None]
            encoded = _attend(
                query,
                jnp.concatenate([state.keys.astype(key.dtype), key], axis=1),
                jnp.concatenate([state.values.astype(value.dtype), value], axis=1),
                mask,
            )
            new_state = AttentionState(
                jax.lax.dynamic_update_slice_in_dim(
                    state.keys, key.astype(state.keys.dtype), write_slot, axis=1
                ),
                jax.lax.dynamic_update_slice_in_dim(
                    state.values, value.astype(state.values.dtype), write_slot, axis=1
                ),
            )
        encoded = constrain(encoded, ("act_batch", "act_length", "act_heads", None))
        out = Dense(
            self.width,
            ("heads", "embed"),
            init_scale=self.out_init_scale,
            param_dtype=pdt,
            name="proj_final",
        )(encoded.reshape(b, t, n * h))
        return out, new_state

    def _rope(self, x: Array, positions: Array) -> Array:
        """RoPE (half-split layout) on the first r dims of each head [b, t, heads, h]."""
        r = self.rotary_dim
        sin, cos = rope_tables(positions, r, self.rope_base)
        return jnp.concatenate([apply_rope(x[..., :r], sin, cos), x[..., r:]], axis=-1)
