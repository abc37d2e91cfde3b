"""Building blocks shared by the Gemma blocks: projections, RMSNorm, RoPE, embedder, GeGLU MLP.

Parameter names follow the official Flax tree (`embedder/input_embedding`, `mlp/gating_einsum`,
...) so that official checkpoints load without renaming. Every parameter carries logical axis
names (see `posttrain.sharding`) that a mesh maps to devices.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from posttrain.sharding import constrain

Array = jax.Array
Initializer = Callable[..., Array]


def partitioned_param(
    module: nn.Module,
    name: str,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype: str,
) -> Array:
    """Declare a parameter annotated with logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


# Variable collection holding each projection weight as a ready [in, out] matrix for decoding.
# XLA keeps loop-invariant slices and transposes inside a decode loop (its loop-invariant code
# motion skips them as cheap), so on CPU every step copied every weight into the layout its
# matmul reads; a decode loop given these matrices reads the weights in place.
DECODE_WEIGHTS = "decode_weights"


def wants_decode_weights(module: nn.Module) -> bool:
    """True when this call should build or read its decode matrices (see `DECODE_WEIGHTS`)."""
    if module.is_initializing():
        return False
    return module.is_mutable_collection(DECODE_WEIGHTS) or module.has_variable(
        DECODE_WEIGHTS, "matrix"
    )


def _matrix_plan(equation: str) -> tuple[str, str, str, str, str]:
    """Split an einsum `x,w->out` whose contracted axes are x's trailing ones.

    Returns (x's kept axes, contracted axes, w's axes, w's kept axes in w's order, out)."""
    inputs, out = equation.split("->")
    x_axes, w_axes = inputs.split(",")
    contracted = "".join(a for a in x_axes if a in w_axes and a not in out)
    if not x_axes.endswith(contracted):
        raise ValueError(f"{equation}: the contracted axes must be the input's trailing axes")
    kept = "".join(a for a in w_axes if a not in contracted)
    return x_axes[: len(x_axes) - len(contracted)], contracted, w_axes, kept, out


def _as_matrix(equation: str, w: Array, dtype: jnp.dtype) -> Array:
    """The weight as an [in, out] matrix for `_matrix_einsum` (contracted axes first)."""
    _, contracted, w_axes, kept, _ = _matrix_plan(equation)
    order = [w_axes.index(a) for a in contracted + kept]
    size = lambda axes: math.prod(w.shape[w_axes.index(a)] for a in axes)  # noqa: E731
    return w.astype(dtype).transpose(order).reshape(size(contracted), size(kept))


def _matrix_einsum(equation: str, x: Array, matrix: Array, w_shape: tuple[int, ...]) -> Array:
    """`einsum(equation, x, w)` computed as one plain matmul against `_as_matrix(w)`."""
    x_kept, _, w_axes, kept, out = _matrix_plan(equation)
    batch_shape = x.shape[: len(x_kept)]
    y = x.reshape(math.prod(batch_shape), matrix.shape[0]) @ matrix
    y = y.reshape(*batch_shape, *(w_shape[w_axes.index(a)] for a in kept))
    return jnp.einsum(f"{x_kept}{kept}->{out}", y)  # only reorders axes


class Einsum(nn.Module):
    """A weight `w` of fixed shape used in an einsum (no bias, as in Gemma)."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    param_dtype: str = "float32"
    init_fn: Initializer = nn.initializers.normal(stddev=0.02)

    @nn.compact
    def __call__(self, equation: str, x: Array) -> Array:
        """Contract `x` with the weight; the weight is cast to the activation dtype."""
        w = partitioned_param(self, "w", self.init_fn, self.shape, self.axes, self.param_dtype)
        if wants_decode_weights(self):
            matrix = self.variable(DECODE_WEIGHTS, "matrix", _as_matrix, equation, w, x.dtype)
            return _matrix_einsum(equation, x, matrix.value, self.shape)
        return jnp.einsum(equation, x, w.astype(x.dtype))


class RMSNorm(nn.Module):
    """x / rms(x) * (1 + scale), computed in float32 and cast back (as transformers does)."""

    eps: float = 1e-6
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Normalise the last axis."""
        scale = partitioned_param(
            self, "scale", nn.initializers.zeros_init(), (x.shape[-1],), ("norm",), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        # eps inside the rsqrt, and the (1 + scale) form: the stored value is the raw scale.
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def rope_tables(positions: Array, head_dim: int, base: float) -> tuple[Array, Array]:
    """sin and cos [b, t, 1, h/2] of the rotary angles for positions [b, t], in float32."""
    half = head_dim // 2
    fraction = 2.0 * jnp.arange(half, dtype=jnp.float32) / head_dim
    timescale = base**fraction  # [h/2]
    angles = positions.astype(jnp.float32)[..., None] / timescale  # [b, t, h/2]
    return jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]


# Largest table (bound x h/2 entries, each of sin and cos) that RoPE reads instead of evaluating.
MAX_ROPE_TABLE = 1 << 20


@functools.cache
def _rope_table(bound: int, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    # Evaluated by the same ops as `rope_tables` on the backend, so both paths agree.
    with jax.ensure_compile_time_eval():
        sin, cos = rope_tables(jnp.arange(bound)[None], head_dim, base)
        return np.asarray(sin[0, :, 0]), np.asarray(cos[0, :, 0])


def rope_sin_cos(
    positions: Array, bound: int | None, head_dim: int, base: float
) -> tuple[Array, Array]:
    """`rope_tables`, read from constant tables when every position is known to be < bound.

    XLA evaluates a sine or cosine fused into each head's rotation once per element, in every
    layer and again in the backward pass: a table read instead made a 4-layer reward step 7-10%
    shorter on CPU. The bound is a promise the caller makes: a position outside [0, bound)
    reads NaN, not the clamped entry a gather would give, so a bound too small for its
    positions shows in the logits instead of shifting them silently.
    """
    if bound is None or bound * (head_dim // 2) > MAX_ROPE_TABLE:
        return rope_tables(positions, head_dim, base)
    inside = ((positions >= 0) & (positions < bound))[..., None]  # [b, t, 1]

    def read(table: np.ndarray) -> Array:
        return jnp.where(inside, jnp.asarray(table)[positions], jnp.nan)[:, :, None, :]

    sin, cos = _rope_table(bound, head_dim, base)
    return read(sin), read(cos)


def apply_rope(x: Array, sin: Array, cos: Array) -> Array:
    """Rotary embedding in the half-split layout ([a|b] halves, not interleaved pairs).

    x: [b, t, n, h]; sin, cos: [b, t, 1, h/2] from `rope_sin_cos`.
    """
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


def soft_cap(x: Array, cap: float | None) -> Array:
    """cap * tanh(x / cap): bounds logits smoothly (Gemma 2)."""
    if cap is None:
        return x
    return cap * jnp.tanh(x / cap)


class Embedder(nn.Module):
    """Token embedding, scaled by sqrt(d); its transpose gives the logits (tied weights)."""

    num_embed: int
    vocab_size: int
    embed_dim: int
    param_dtype: str = "float32"

    def setup(self) -> None:
        """Declare the embedding table [num_embed, d]."""
        self.input_embedding = partitioned_param(
            self,
            "input_embedding",
            # Unit-variance logits at init: the tied output sums d terms of the normalised state.
            nn.initializers.normal(stddev=self.embed_dim**-0.5),
            (self.num_embed, self.embed_dim),
            ("vocab", "embed"),
            self.param_dtype,
        )

    def encode(self, tokens: Array, dtype: str) -> Array:
        """Embed tokens [b, t] into [b, t, d]."""
        x = jnp.take(self.input_embedding, tokens, axis=0).astype(dtype)
        # sqrt(d) is rounded to the activation dtype first, as both references do (55.5 in bf16
        # for d=3072).
        return x * jnp.asarray(self.embed_dim**0.5, dtype=jnp.float32).astype(dtype)

    def decode(self, x: Array) -> Array:
        """Float32 logits [b, t, v] over the real vocabulary (padding rows never scored)."""
        return unembed(self.input_embedding, x, self.vocab_size)


def unembed(embedding: Array, x: Array, vocab_size: int) -> Array:
    """Project hidden states [..., d] to float32 logits [..., v] with the tied embedding."""
    table = embedding[:vocab_size].astype(x.dtype)
    flat = x.reshape(-1, x.shape[-1])  # one token axis: XLA's CPU matmul fast path
    logits = jnp.einsum("Td,vd->Tv", flat, table, preferred_element_type=jnp.float32)
    return logits.reshape(*x.shape[:-1], vocab_size)


_MLP_AXES = ("act_batch", "act_length", "act_mlp")


class FeedForward(nn.Module):
    """GeGLU: (gelu_tanh(x W0) * x W1) W2. Index 0 of the gating weight is the GELU branch."""

    embed_dim: int
    hidden_dim: int
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Apply the MLP to [b, t, d]."""
        d, f = self.embed_dim, self.hidden_dim
        gating = partitioned_param(
            self,
            "gating_einsum",
            nn.initializers.normal(stddev=0.02),
            (2, d, f),
            (None, "embed", "mlp"),
            self.param_dtype,
        )
        linear = partitioned_param(
            self,
            "linear",
            nn.initializers.normal(stddev=0.02),
            (f, d),
            ("mlp", "embed"),
            self.param_dtype,
        )
        tokens = x.reshape(-1, d)  # [b*t, d]
        if wants_decode_weights(self):
            # Both branches as one [d, 2f] matmul (see DECODE_WEIGHTS).
            matrix = self.variable(
                DECODE_WEIGHTS,
                "matrix",
                lambda: gating.astype(x.dtype).transpose(1, 0, 2).reshape(d, 2 * f),
            ).value
            both = (tokens @ matrix).reshape(*x.shape[:-1], 2 * f)
            gate = constrain(both[..., :f], _MLP_AXES)
            up = constrain(both[..., f:], _MLP_AXES)
        else:
            # Tokens flattened to one axis and the two branches as separate plain matmuls: XLA's
            # CPU backward of the stacked [2, b, t, f] einsum ran 2.4x slower
            # (experiments/bench/backbone).
            gating = gating.astype(x.dtype)
            gate = constrain((tokens @ gating[0]).reshape(*x.shape[:-1], f), _MLP_AXES)
            up = constrain((tokens @ gating[1]).reshape(*x.shape[:-1], f), _MLP_AXES)
        # The tanh approximation of GELU: exact erf differs by ~1e-3 on the logits.
        hidden = jax.nn.gelu(gate, approximate=True) * up
        out = hidden.reshape(-1, f) @ linear.astype(x.dtype)
        return out.reshape(x.shape)
