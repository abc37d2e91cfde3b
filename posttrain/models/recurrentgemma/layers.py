"""Griffin's recurrent pieces: dense and block-diagonal projections, the masked Conv1D, the
RG-LRU and its linear recurrence, and the MLP with biases.

Parameter names and shapes are the official Flax tree's (`kernel`/`bias`, `conv_1d/w`,
`rg_lru/a_param`, `mlp_block/ffw_up/w` ...; `shared/design/backbone.md` §3.4), so an official
checkpoint's tree is ours. Each parameter carries logical axis names shared with the Gemma
backbone ("embed", "mlp", "heads", ...): the lru width is sharded like an MLP width (each of its
channels is independent), the gate blocks like heads.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from posttrain.models.layers import partitioned_param
from posttrain.sharding import constrain

Array = jax.Array

_LRU_AXES = ("act_batch", "act_length", "act_mlp")


class TokenMeta(NamedTuple):
    """What the temporal blocks need of each token [b, t].

    positions: position within its document (RoPE, and the window in decode mode);
    resets: position == 0, where the RG-LRU takes its input unscaled (both references' rule);
    starts: a new document begins here (position 0 or a change of segment id): no state, conv
    tap or attention crosses it;
    docs: running count of starts along the row, so two tokens share a document iff equal.
    """

    positions: Array
    resets: Array
    starts: Array
    docs: Array


def fan_in_init(
    scale: float = 1.0, in_axis: int | Sequence[int] = -2
) -> nn.initializers.Initializer:
    """Normal with variance scale / fan_in (the official initialisers)."""
    return nn.initializers.variance_scaling(scale, "fan_in", "normal", in_axis=in_axis)


class Dense(nn.Module):
    """x @ kernel (+ bias), kernel [in, out]; the weight is cast to the activation dtype."""

    features: int
    axes: tuple[str | None, str | None]  # logical names of the kernel's (in, out) axes
    use_bias: bool = True
    init_scale: float = 1.0
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Project the last axis of x."""
        shape = (x.shape[-1], self.features)
        kernel = partitioned_param(
            self, "kernel", fan_in_init(self.init_scale), shape, self.axes, self.param_dtype
        )
        y = (x.reshape(-1, shape[0]) @ kernel.astype(x.dtype)).reshape(*x.shape[:-1], shape[1])
        if self.use_bias:
            bias = partitioned_param(
                self,
                "bias",
                nn.initializers.zeros_init(),
                (shape[1],),
                self.axes[1:],
                self.param_dtype,
            )
            y = y + bias.astype(x.dtype)
        return y


class BlockDiagonalLinear(nn.Module):
    """n independent [l/n, l/n] projections of the n blocks of the last axis, plus a bias."""

    num_blocks: int
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """[..., l] -> [..., l]."""
        n, width = self.num_blocks, x.shape[-1]
        size = width // n
        w = partitioned_param(
            self, "w", fan_in_init(), (n, size, size), ("heads", None, None), self.param_dtype
        )
        b = partitioned_param(
            self, "b", nn.initializers.zeros_init(), (n, size), ("heads", None), self.param_dtype
        )
        blocks = x.reshape(*x.shape[:-1], n, size)  # [..., n, l/n]
        y = jnp.einsum("...ni,nij->...nj", blocks, w.astype(x.dtype)) + b.astype(x.dtype)
        return y.reshape(x.shape)


class Conv1D(nn.Module):
    """Depthwise causal convolution over k taps that never reads across a document start.

    out[t] = b + sum_{j<k} w[k-1-j] * u[t-j], where tap j is kept only while t-j is in t's
    document (w[k-1] multiplies the current token). `state` [b, k-1, l] holds the inputs before
    the first token, all in the document that continues (zeros for a fresh row).
    """

    width: int  # l
    taps: int = 4  # k
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, u: Array, meta: TokenMeta, state: Array | None) -> tuple[Array, Array]:
        """Convolve u [b, t, l]; return the output and the last k-1 inputs of the last document."""
        k, (b, t, width) = self.taps, u.shape
        w = partitioned_param(
            self, "w", fan_in_init(0.01), (k, width), (None, "mlp"), self.param_dtype
        )
        bias = partitioned_param(
            self, "b", nn.initializers.zeros_init(), (width,), ("mlp",), self.param_dtype
        )
        if state is None:
            state = jnp.zeros((b, k - 1, width), u.dtype)
        extended = jnp.concatenate([state.astype(u.dtype), u], axis=1)  # [b, k-1+t, l]
        # The state belongs to document 0: the one a row continues until its first start.
        docs = jnp.concatenate([jnp.zeros((b, k - 1), meta.docs.dtype), meta.docs], axis=1)
        out = jnp.zeros_like(u) + bias.astype(u.dtype)
        for j in range(k):  # tap j reads the input j steps back
            window = extended[:, k - 1 - j : k - 1 - j + t]
            keep = (docs[:, k - 1 - j : k - 1 - j + t] == meta.docs)[..., None]
            out = out + jnp.where(keep, window, 0) * w[k - 1 - j].astype(u.dtype)
        last_doc = meta.docs[:, -1:]
        tail_keep = (docs[:, -(k - 1) :] == last_doc)[..., None] if k > 1 else None
        new_state = extended[:, extended.shape[1] - (k - 1) :]
        if tail_keep is not None:
            new_state = jnp.where(tail_keep, new_state, 0)
        return out, new_state


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def sqrt_bounded_grad(x: Array, max_gradient: float) -> Array:
    """sqrt(x) whose derivative is capped at `max_gradient` (d/dx sqrt blows up at x = 0)."""
    return jnp.sqrt(x)


def _sqrt_fwd(x: Array, max_gradient: float) -> tuple[Array, Array]:
    return jnp.sqrt(x), x


def _sqrt_bwd(max_gradient: float, x: Array, g: Array) -> tuple[Array]:
    # 1 / (2 sqrt(x)) <= max_gradient  <=>  x >= 1 / (4 max_gradient^2).
    floor = 1.0 / (4.0 * max_gradient**2)
    return (g * 0.5 * jax.lax.rsqrt(jnp.maximum(x, floor)),)


sqrt_bounded_grad.defvjp(_sqrt_fwd, _sqrt_bwd)


def linear_recurrence(a: Array, x: Array, h0: Array | None, method: str) -> Array:
    """h_t = a_t * h_{t-1} + x_t along axis 1 of [b, t, l], with h_{-1} = h0 (or 0).

    "associative" runs the parallel prefix scan of the pairs (a, x) under
    (a1, x1) . (a2, x2) = (a1 a2, a2 x1 + x2): O(log t) depth; "sequential" is the plain loop.
    """
    if method == "sequential":
        init = jnp.zeros_like(x[:, 0]) if h0 is None else h0.astype(x.dtype)

        def step(h: Array, ax: tuple[Array, Array]) -> tuple[Array, Array]:
            h = ax[0] * h + ax[1]
            return h, h

        _, hs = jax.lax.scan(step, init, (a.swapaxes(0, 1), x.swapaxes(0, 1)))
        return hs.swapaxes(0, 1)

    def combine(left: tuple[Array, Array], right: tuple[Array, Array]) -> tuple[Array, Array]:
        return left[0] * right[0], right[0] * left[1] + right[1]

    a_prod, h = jax.lax.associative_scan(combine, (a, x), axis=1)
    if h0 is not None:
        h = h + a_prod * h0[:, None].astype(h.dtype)
    return h


def _ring_init(min_radius: float = 0.9, max_radius: float = 0.999) -> nn.initializers.Initializer:
    """a_param such that a = sigmoid(-a_param) has |a|^2 uniform on [min^2, max^2]."""

    def init(key: Array, shape: Sequence[int], dtype: str = "float32") -> Array:
        radius_sq = jax.random.uniform(key, shape, minval=min_radius**2, maxval=max_radius**2)
        # sigmoid(-p) = exp(-softplus(p)) = radius  <=>  p = log(expm1(-log radius)).
        return jnp.log(jnp.expm1(-0.5 * jnp.log(radius_sq))).astype(dtype)

    return init


class RGLRU(nn.Module):
    """Real-Gated Linear Recurrent Unit (Griffin, eq. 1-4), c = 8.

    i_t = sigmoid(W_i u_t + b_i), r_t = sigmoid(W_a u_t + b_a) (block-diagonal W),
    log a_t = -c r_t softplus(a_param), h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t u_t), except at
    a reset (position 0), where the input is not scaled, and at a document start, where
    h_{t-1} is dropped. The recurrence runs in float32 whatever the activation dtype.
    """

    width: int  # l
    num_heads: int  # n
    c: float = 8.0
    scan: str = "associative"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, u: Array, meta: TokenMeta, h0: Array | None) -> tuple[Array, Array]:
        """u [b, t, l] -> (h [b, t, l] in u's dtype, last h [b, l] in float32)."""
        a_param = partitioned_param(
            self, "a_param", _ring_init(), (self.width,), ("mlp",), self.param_dtype
        )

        def gate(name: str) -> Array:
            projected = BlockDiagonalLinear(self.num_heads, self.param_dtype, name=name)(u)
            return jax.nn.sigmoid(projected.astype(jnp.float32))

        gate_x, gate_a = gate("input_gate"), gate("a_gate")
        log_a = -self.c * gate_a * jax.nn.softplus(a_param.astype(jnp.float32))
        a, a_squared = jnp.exp(log_a), jnp.exp(2.0 * log_a)
        # sqrt'(1 - a^2) is unbounded as a -> 1; the reference caps it (NaNs in bf16 training).
        multiplier = jnp.where(
            meta.resets[..., None], 1.0, sqrt_bounded_grad(1.0 - a_squared, 1000.0)
        )
        x = u.astype(jnp.float32) * gate_x * multiplier
        a = jnp.where(meta.starts[..., None], 0.0, a)
        h = linear_recurrence(a, x, h0, self.scan)
        return constrain(h.astype(u.dtype), _LRU_AXES), h[:, -1]


class RecurrentState(NamedTuple):
    """Decoding state of one recurrent block: O(1) in the sequence length."""

    conv: Array  # [b, k-1, l]: the last k-1 Conv1D inputs, activation dtype
    lru: Array  # [b, l]: the RG-LRU state, float32


class RecurrentBlock(nn.Module):
    """out = linear_out(RG_LRU(Conv1D(linear_x(x))) * gelu_tanh(linear_y(x)))."""

    width: int  # d
    lru_width: int  # l
    num_heads: int
    conv_width: int = 4
    c: float = 8.0
    scan: str = "associative"
    out_init_scale: float = 1.0
    param_dtype: str = "float32"

    @nn.compact
    def __call__(
        self, x: Array, meta: TokenMeta, state: RecurrentState | None
    ) -> tuple[Array, RecurrentState]:
        """Mix x [b, t, d] along time; return the output and the state after the last token."""
        pdt, lw = self.param_dtype, self.lru_width
        y = Dense(lw, ("embed", "mlp"), param_dtype=pdt, name="linear_y")(x)
        y = constrain(jax.nn.gelu(y, approximate=True), _LRU_AXES)
        u = constrain(Dense(lw, ("embed", "mlp"), param_dtype=pdt, name="linear_x")(x), _LRU_AXES)
        u, conv_state = Conv1D(lw, self.conv_width, pdt, name="conv_1d")(
            u, meta, None if state is None else state.conv
        )
        h, lru_state = RGLRU(lw, self.num_heads, self.c, self.scan, pdt, name="rg_lru")(
            u, meta, None if state is None else state.lru
        )
        out = Dense(
            self.width,
            ("mlp", "embed"),
            init_scale=self.out_init_scale,
            param_dtype=pdt,
            name="linear_out",
        )(h * y)
        return out, RecurrentState(conv_state, lru_state)


class BranchPair(nn.Module):
    """Both MLP branches' projections: w [2, d, f] and b [2, 1, 1, f] (`ffw_up`)."""

    mlp_width: int  # f
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        """[b, t, d] -> the GELU branch and the linear branch, each [b, t, f]."""
        d, f = x.shape[-1], self.mlp_width
        w = partitioned_param(
            self, "w", fan_in_init(in_axis=1), (2, d, f), (None, "embed", "mlp"), self.param_dtype
        )
        b = partitioned_param(
            self,
            "b",
            nn.initializers.zeros_init(),
            (2, 1, 1, f),
            (None, None, None, "mlp"),
            self.param_dtype,
        )
        w, b = w.astype(x.dtype), b.astype(x.dtype)
        tokens = x.reshape(-1, d)
        # Two plain matmuls rather than the stacked [2, ...] einsum (a faster backward on CPU).
        gate = (tokens @ w[0] + b[0, 0]).reshape(*x.shape[:-1], f)
        up = (tokens @ w[1] + b[1, 0]).reshape(*x.shape[:-1], f)
        return gate, up


class MLPBlock(nn.Module):
    """gelu_tanh(x W0 + b0) * (x W1 + b1), projected back by a biased dense layer."""

    width: int  # d
    mlp_width: int  # f
    out_init_scale: float = 1.0
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Apply the MLP to [b, t, d]."""
        gate, up = BranchPair(self.mlp_width, self.param_dtype, name="ffw_up")(x)
        hidden = constrain(jax.nn.gelu(gate, approximate=True) * up, _LRU_AXES)
        return Dense(
            self.width,
            ("mlp", "embed"),
            init_scale=self.out_init_scale,
            param_dtype=self.param_dtype,
            name="ffw_down",
        )(hidden)
