"""The RecurrentGemma (Griffin) decoder and its entry points: forward, prefill, decode_step.

A row is a sequence of documents: segment ids mark them (0 for padding, as in the Gemma
backbone) and positions count from 0 within each. Nothing crosses a document start (position
0 or a change of segment id): not the RG-LRU state, not a Conv1D tap, not attention. So left
padding, packing and running each document alone give the same logits, which the official
code also guarantees (its `segment_pos`) and transformers does not (its Conv1D reads across).

Decoding carries O(1) state per row: each recurrent block's last k-1 Conv1D inputs and RG-LRU
state, and each attention block's ring buffer of w keys and values. The same state lets several
continuations of one prompt run from a single prefill (`forked_hidden`): each is a parallel
pass seeded by it, its scan starting from the RG-LRU state, its Conv1D reading the cached
inputs, its attention the cached keys.

Shape letters besides the config's: m branches continuing one prompt, x prompt tokens.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from posttrain.models.layers import RMSNorm, partitioned_param, soft_cap, unembed
from posttrain.models.recurrentgemma.attention import AttentionState, LocalAttentionBlock, ring_fill
from posttrain.models.recurrentgemma.config import BlockType, RecurrentGemmaConfig
from posttrain.models.recurrentgemma.layers import (
    MLPBlock,
    RecurrentBlock,
    RecurrentState,
    TokenMeta,
    fan_in_init,
)
from posttrain.models.transformer import check_token_ids, positions_from_segments
from posttrain.sharding import constrain

Array = jax.Array
Params = dict[str, Any]
LayerState = RecurrentState | AttentionState


class RecurrentGemmaState(NamedTuple):
    """Everything decoding needs to continue a batch of rows."""

    layers: tuple[LayerState, ...]
    key_positions: Array  # [b, w]: position of the key in each ring slot, -1 where none
    index: Array  # scalar int32: time step of the next token (its ring slot is index % w)


class RecurrentGemmaOutput(NamedTuple):
    """Float32 logits [b, t, v] (None if not asked for), final normalised hidden states
    [b, t, d], and the state after the last token (None unless asked for)."""

    logits: Array | None
    hidden: Array
    state: RecurrentGemmaState | None


def token_meta(positions: Array, segment_ids: Array | None) -> TokenMeta:
    """Resets, document starts and document numbers of tokens [b, t]."""
    resets = positions == 0
    starts = resets
    if segment_ids is not None and segment_ids.shape[1] > 1:
        changed = segment_ids[:, 1:] != segment_ids[:, :-1]
        starts = starts | jnp.pad(changed, ((0, 0), (1, 0)))
    docs = jnp.cumsum(starts.astype(jnp.int32), axis=1)
    return TokenMeta(positions, resets, starts, docs)


class EmbeddingTable(nn.Module):
    """The tied token embedding [v, d] (`embedder/input_embedding`)."""

    vocab_size: int
    width: int
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self) -> Array:
        """The table itself: rows embed tokens, its transpose gives the logits."""
        return partitioned_param(
            self,
            "input_embedding",
            fan_in_init(in_axis=1),
            (self.vocab_size, self.width),
            ("vocab", "embed"),
            self.param_dtype,
        )


class ResidualBlock(nn.Module):
    """raw -> y = temporal(norm(raw)) + raw -> mlp(norm(y)) + y."""

    config: RecurrentGemmaConfig
    block_type: BlockType

    @nn.compact
    def __call__(
        self,
        x: Array,
        meta: TokenMeta,
        state: LayerState | None,
        key_positions: Array | None,
        write_slot: Array | None,
    ) -> tuple[Array, LayerState]:
        """Apply the block to x [b, t, d]."""
        cfg = self.config
        pdt = cfg.param_dtype
        out_scale = 2.0 / cfg.num_layers  # the official init of each block's last projection
        h = RMSNorm(cfg.norm_eps, pdt, name="temporal_pre_norm")(x)
        if self.block_type == "recurrent":
            mixed, new_state = RecurrentBlock(
                width=cfg.width,
                lru_width=cfg.lru_width,
                num_heads=cfg.num_heads,
                conv_width=cfg.conv_width,
                c=cfg.lru_c,
                scan=cfg.scan,
                out_init_scale=out_scale,
                param_dtype=pdt,
                name="recurrent_block",
            )(h, meta, state)
        else:
            mixed, new_state = LocalAttentionBlock(
                width=cfg.width,
                num_heads=cfg.num_heads,
                window=cfg.attention_window,
                visible=cfg.visible_keys,
                rotary_dim=cfg.rotary_dim,
                rope_base=cfg.rope_base,
                out_init_scale=out_scale,
                param_dtype=pdt,
                name="attention_block",
            )(h, meta, state, key_positions, write_slot)
        x = x + mixed
        h = RMSNorm(cfg.norm_eps, pdt, name="channel_pre_norm")(x)
        x = x + MLPBlock(cfg.width, cfg.mlp_width, out_scale, pdt, name="mlp_block")(h)
        return constrain(x, ("act_batch", "act_length", "act_embed")), new_state


class RecurrentGemma(nn.Module):
    """Griffin decoder mapping token ids [b, t] to logits [b, t, v]."""

    config: RecurrentGemmaConfig

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        state: RecurrentGemmaState | None = None,
        compute_logits: bool = True,
        return_state: bool = False,
        context: RecurrentGemmaState | None = None,
    ) -> RecurrentGemmaOutput:
        """Run the decoder.

        tokens, positions, segment_ids: [b, t] ints; without positions they count from 0 within
        each segment. With a `state` (decode mode) t must be 1 and the new state is returned.
        `return_state` (sequence mode) also returns the state after the last token, for
        decoding to continue from: a prefill. With a `context` (extend mode) the t tokens
        continue the context's rows in one parallel pass, their positions following its last
        one; the context is only read and no state is returned (a fork of a prefill).
        """
        cfg = self.config
        if context is not None and (state is not None or return_state or positions is None):
            raise ValueError("extend mode takes positions, and neither a state nor return_state")
        if positions is None:
            positions = positions_from_segments(
                segment_ids if segment_ids is not None else jnp.ones_like(tokens)
            )
        positions = positions.astype(jnp.int32)
        meta = token_meta(positions, None if state is not None else segment_ids)
        embedding = EmbeddingTable(cfg.vocab_size, cfg.width, cfg.param_dtype, name="embedder")()
        x = jnp.take(embedding, tokens, axis=0).astype(cfg.dtype)
        x = x * jnp.asarray(cfg.embed_scale, cfg.dtype)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))

        write_slot = None if state is None else state.index % cfg.attention_window
        # Extend mode is decode mode's reading of the state without its write slot.
        given = state if state is not None else context
        block_cls = nn.remat(ResidualBlock, static_argnums=()) if cfg.remat else ResidualBlock
        layer_states = []
        for i, block_type in enumerate(cfg.block_types):
            x, layer_state = block_cls(cfg, block_type, name=f"blocks.{i}")(
                x,
                meta,
                None if given is None else given.layers[i],
                None if given is None else given.key_positions,
                write_slot,
            )
            layer_states.append(layer_state)
        hidden = RMSNorm(cfg.norm_eps, cfg.param_dtype, name="final_norm")(x)
        logits = None
        if compute_logits:
            logits = soft_cap(unembed(embedding, hidden, cfg.vocab_size), cfg.logit_softcap)
            logits = constrain(logits, ("act_batch", "act_length", "act_vocab"))

        if state is not None:
            key_positions = jax.lax.dynamic_update_slice_in_dim(
                state.key_positions, positions, write_slot, axis=1
            )
            new_state = RecurrentGemmaState(tuple(layer_states), key_positions, state.index + 1)
            return RecurrentGemmaOutput(logits, hidden, new_state)
        if not return_state:
            return RecurrentGemmaOutput(logits, hidden, None)
        return RecurrentGemmaOutput(
            logits, hidden, _state_after(cfg, layer_states, meta, segment_ids)
        )


def _state_after(
    config: RecurrentGemmaConfig,
    layer_states: list[LayerState],
    meta: TokenMeta,
    segment_ids: Array | None,
) -> RecurrentGemmaState:
    """The decoding state after a sequence: only the last document of each row is kept."""
    length = meta.positions.shape[1]
    in_last_doc = meta.docs == meta.docs[:, -1:]
    if segment_ids is not None:
        in_last_doc &= segment_ids > 0
    key_positions = ring_fill(
        jnp.where(in_last_doc, meta.positions, -1), config.attention_window, -1
    )
    # A row that ends in padding has no document to continue: its recurrent state is zero.
    real_end = in_last_doc[:, -1]
    layers = tuple(
        RecurrentState(
            jnp.where(real_end[:, None, None], s.conv, 0), jnp.where(real_end[:, None], s.lru, 0)
        )
        if isinstance(s, RecurrentState)
        else s
        for s in layer_states
    )
    return RecurrentGemmaState(layers, key_positions, jnp.asarray(length, jnp.int32))


def init_params(config: RecurrentGemmaConfig, rng: Array) -> Params:
    """Random parameters (plain arrays, logical annotations stripped)."""
    return _compiled_init(config)(rng)


@functools.cache
def _compiled_init(config: RecurrentGemmaConfig):
    # One compiled initialiser per config: eager Flax init compiles every op on its own.
    def init(rng: Array) -> Params:
        variables = RecurrentGemma(config).init(rng, jnp.zeros((1, 1), jnp.int32))
        return nn.unbox(variables["params"])

    return jax.jit(init)


def abstract_params(config: RecurrentGemmaConfig) -> Params:
    """Parameter shapes and dtypes without allocating anything."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def param_count(config: RecurrentGemmaConfig) -> int:
    """Number of parameters, from abstract shapes."""
    return sum(leaf.size for leaf in jax.tree.leaves(abstract_params(config)))


def param_logical_axes(config: RecurrentGemmaConfig) -> Params:
    """Tree of logical axis names (PartitionSpec of names) matching the parameter tree."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda: RecurrentGemma(config).init(jax.random.key(0), tokens))
    return nn.get_partition_spec(boxed)["params"]


def forward(
    config: RecurrentGemmaConfig,
    params: Params,
    tokens: Array,
    positions: Array | None = None,
    segment_ids: Array | None = None,
) -> Array:
    """Float32 logits [b, t, v] of whole rows; concrete out-of-range ids raise."""
    check_token_ids(tokens, config.vocab_size, "forward")
    return RecurrentGemma(config).apply({"params": params}, tokens, positions, segment_ids).logits


def hidden_states(
    config: RecurrentGemmaConfig,
    params: Params,
    tokens: Array,
    positions: Array | None = None,
    segment_ids: Array | None = None,
) -> Array:
    """Final normalised hidden states [b, t, d] (no vocabulary projection)."""
    out = RecurrentGemma(config).apply(
        {"params": params}, tokens, positions, segment_ids, compute_logits=False
    )
    return out.hidden


def logits_from_hidden(config: RecurrentGemmaConfig, params: Params, hidden: Array) -> Array:
    """Float32 soft-capped logits for hidden states [..., d] (lets losses chunk the vocabulary)."""
    embedding = params["embedder"]["input_embedding"]
    return soft_cap(unembed(embedding, hidden, config.vocab_size), config.logit_softcap)


def prefill(
    config: RecurrentGemmaConfig,
    params: Params,
    tokens: Array,
    positions: Array | None = None,
    segment_ids: Array | None = None,
) -> tuple[Array, RecurrentGemmaState]:
    """Run (left-padded) prompts [b, t] in parallel; return their logits and the state that
    continues the last document of each row."""
    out = RecurrentGemma(config).apply(
        {"params": params}, tokens, positions, segment_ids, return_state=True
    )
    return out.logits, out.state


def forked_hidden(
    config: RecurrentGemmaConfig,
    params: Params,
    prompt: Array,
    prompt_segments: Array,
    tokens: Array,
    positions: Array,
    segment_ids: Array,
) -> Array:
    """Hidden states [b, m, t, d] of m continuations [b, m, t] of each left-padded prompt [b, x],
    the prompt run once and its state seeding every branch."""
    model = RecurrentGemma(config)
    # Left padding puts every prompt's last token in the last column, where the prefill's state
    # is taken; an all-padding prompt gives the state of a fresh row.
    prefix = model.apply(
        {"params": params}, prompt, None, prompt_segments, compute_logits=False, return_state=True
    )
    b, m, t = tokens.shape
    out = model.apply(
        {"params": params},
        tokens.reshape(b * m, t),  # [b * m, t]: branch j of row i is row i * m + j
        positions.reshape(b * m, t),
        segment_ids.reshape(b * m, t),
        compute_logits=False,
        context=repeat_rows(prefix.state, m),
    )
    return out.hidden.reshape(b, m, t, -1)


def decode_step(
    config: RecurrentGemmaConfig,
    params: Params,
    tokens: Array,
    positions: Array,
    state: RecurrentGemmaState,
) -> tuple[Array, RecurrentGemmaState]:
    """Feed one token per row (tokens, positions: [b, 1]); return logits [b, 1, v] and the new
    state. Position 0 starts a new document in that row."""
    out = RecurrentGemma(config).apply({"params": params}, tokens, positions, None, state)
    return out.logits, out.state


def init_state(
    config: RecurrentGemmaConfig, batch: int, dtype: str | None = None
) -> RecurrentGemmaState:
    """The state of rows that have seen nothing (decoding can start from it at position 0)."""
    dtype = dtype or config.dtype
    w, h, lw = config.attention_window, config.head_dim, config.lru_width
    layers = tuple(
        RecurrentState(
            jnp.zeros((batch, config.conv_width - 1, lw), dtype),
            jnp.zeros((batch, lw), jnp.float32),
        )
        if kind == "recurrent"
        else AttentionState(jnp.zeros((batch, w, h), dtype), jnp.zeros((batch, w, h), dtype))
        for kind in config.block_types
    )
    return RecurrentGemmaState(
        layers, jnp.full((batch, w), -1, jnp.int32), jnp.zeros((), jnp.int32)
    )


def select_rows(state: RecurrentGemmaState, rows: Array) -> RecurrentGemmaState:
    """A state whose row i is row `rows[i]` of this one (beam reordering, replication)."""
    take = functools.partial(jnp.take, indices=rows, axis=0)
    return RecurrentGemmaState(
        jax.tree.map(take, state.layers), take(state.key_positions), state.index
    )


def repeat_rows(state: RecurrentGemmaState, repeats: int) -> RecurrentGemmaState:
    """Each row `repeats` times in a row ([b, ...] -> [b * repeats, ...]): several samples of
    one prompt continue from one prefill."""
    if repeats == 1:
        return state
    repeat = functools.partial(jnp.repeat, repeats=repeats, axis=0)
    return RecurrentGemmaState(
        jax.tree.map(repeat, state.layers), repeat(state.key_positions), state.index
    )
