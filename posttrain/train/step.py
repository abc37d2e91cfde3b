"""The train state and the jitted optimizer step with gradient accumulation.

Each micro-batch's loss is a (sum, count) pair; gradients of the sums are accumulated and then
divided by the global count, so four unequal micro-batches give exactly the gradient of the
whole batch (not a mean of means). A step whose loss or gradient is not finite leaves the state
unchanged and reports it; the loop decides whether to stop or skip.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
Params = Any
Batch = Any
# (params, micro-batch[, PRNG key]) -> (summed loss, number of loss tokens); the key is passed
# only to losses built with `needs_rng=True` (dropout), one fresh key per step and micro-batch.
LossTerms = Callable[..., tuple[Array, Array]]


class TrainState(NamedTuple):
    """Everything a resumed run needs besides the data position."""

    params: Params
    opt_state: Any
    step: Array  # int32 scalar
    rng: Array  # raw uint32 key data (checkpoint-friendly)


def init_state(params: Params, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """A fresh state at step 0."""
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def split_micro_batches(batch: Batch, micro_batches: int) -> Batch:
    """[B, ...] arrays -> [m, B/m, ...]."""

    def split(x: Array) -> Array:
        if x.shape[0] % micro_batches:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {micro_batches}")
        return x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:])

    return jax.tree.map(split, batch)


def accumulated_gradients(
    loss_terms: LossTerms,
    params: Params,
    batch: Batch,
    micro_batches: int,
    rng: Array | None = None,
) -> tuple[Params, Array, Array]:
    """(gradient of the token-mean loss, token-mean loss, token count) over all micro-batches;
    with `rng`, micro-batch i's loss gets the key fold_in(rng, i)."""

    def one(carry, indexed):
        index, micro = indexed
        grads, total, count = carry
        extra = () if rng is None else (jax.random.fold_in(rng, index),)
        (loss_sum, tokens), micro_grads = jax.value_and_grad(
            lambda p: loss_terms(p, micro, *extra), has_aux=True
        )(params)
        grads = jax.tree.map(jnp.add, grads, micro_grads)
        return (grads, total + loss_sum, count + tokens), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    indexed = (jnp.arange(micro_batches), split_micro_batches(batch, micro_batches))
    (grads, total, count), _ = jax.lax.scan(one, init, indexed)
    denominator = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grads, params)
    return grads, total / denominator, count


def make_train_step(
    loss_terms: LossTerms,
    optimizer: optax.GradientTransformation,
    micro_batches: int = 1,
    needs_rng: bool = False,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]:
    """A jitted (state, batch) -> (state, metrics) step; `needs_rng` passes the loss a key."""

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Array]]:
        keys = jax.random.split(jax.random.wrap_key_data(state.rng))
        grads, loss, tokens = accumulated_gradients(
            loss_terms, state.params, batch, micro_batches, keys[1] if needs_rng else None
        )
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        rng = jax.random.key_data(keys[0])
        stepped = TrainState(params, opt_state, state.step + 1, rng)
        # A non-finite step changes nothing, so the last good state (and checkpoint) survive.
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), stepped, state)
        metrics = dict(loss=loss, tokens=tokens, grad_norm=grad_norm, finite=finite)
        return new_state, metrics

    return jax.jit(step, donate_argnums=0)
