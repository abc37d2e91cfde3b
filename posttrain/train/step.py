"""The train state and the jitted optimizer step with gradient accumulation.

Each micro-batch's loss is a (sum, count) pair; gradients of the sums are accumulated and then
divided by the global count, so four unequal micro-batches give exactly the gradient of the
whole batch (not a mean of means). A step whose loss or gradient is not finite leaves the state
unchanged and reports it; the loop decides whether to stop or skip.

What a loss sees, by keyword, only when the step is built to pass it:
- `frozen`: trees that are not trained (a reference policy, an anchor, a reward model). They are
  arguments of the compiled step, never closed over: a closed-over tree becomes a compile-time
  constant (copied into the executable, recompiled whenever it changes).
- `extras`: the state's extra trees and numbers (an EMA anchor, a moving-average baseline,
  counters) as they were before this step; `update_extras` computes the next ones from the
  stepped parameters, and they are checkpointed with the rest of the state.
- `key`: a fresh PRNG key per step and micro-batch (dropout, sampling inside the loss).
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
# (params, micro-batch, **inputs) -> (summed loss, count) or (summed loss, count, aux sums):
# aux is a dict of per-micro-batch sums, reported divided by the global count like the loss.
LossTerms = Callable[..., tuple]
# (extras before the step, stepped params, aux means, frozen trees) -> extras after the step.
UpdateExtras = Callable[[Any, Params, dict[str, Array], Any], Any]


class TrainState(NamedTuple):
    """Everything a resumed run needs besides the data position."""

    params: Params
    opt_state: Any
    step: Array  # int32 scalar
    rng: Array  # raw uint32 key data (checkpoint-friendly)
    extras: Any = None  # extra trees and numbers updated after the optimizer step


def init_state(
    params: Params, optimizer: optax.GradientTransformation, seed: int, extras: Any = None
) -> TrainState:
    """A fresh state at step 0."""
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
        extras={} if extras is None else extras,
    )


def split_micro_batches(batch: Batch, micro_batches: int) -> Batch:
    """[B, ...] arrays -> [m, B/m, ...]."""

    def split(x: Array) -> Array:
        if x.shape[0] % micro_batches:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {micro_batches}")
        return x.reshape(micro_batches, x.shape[0] // micro_batches, *x.shape[1:])

    return jax.tree.map(split, batch)


def _terms(result: tuple) -> tuple[Array, Array, dict[str, Array]]:
    if len(result) == 2:
        return result[0], result[1], {}
    return result


def accumulated_gradients(
    loss_terms: LossTerms,
    params: Params,
    batch: Batch,
    micro_batches: int,
    rng: Array | None = None,
    inputs: dict[str, Any] | None = None,
) -> tuple[Params, Array, Array, dict[str, Array]]:
    """(gradient of the token-mean loss, token-mean loss, token count, aux means) over all
    micro-batches; with `rng`, micro-batch i's loss gets `key=fold_in(rng, i)`; `inputs` are
    passed to the loss by keyword."""
    inputs = inputs or {}

    def one(carry, indexed):
        index, micro = indexed
        grads, total, count, aux = carry
        keyed = {} if rng is None else {"key": jax.random.fold_in(rng, index)}

        def loss_fn(p):
            loss_sum, tokens, micro_aux = _terms(loss_terms(p, micro, **inputs, **keyed))
            return loss_sum, (tokens, micro_aux)

        (loss_sum, (tokens, micro_aux)), micro_grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params
        )
        grads = jax.tree.map(jnp.add, grads, micro_grads)
        aux = {k: aux[k] + jnp.asarray(v, jnp.float32) for k, v in micro_aux.items()}
        return (grads, total + loss_sum, count + tokens, aux), None

    micro = split_micro_batches(batch, micro_batches)
    # The aux keys and shapes come from tracing the loss once on the first micro-batch.
    first = jax.tree.map(lambda x: x[0], micro)
    keyed = {} if rng is None else {"key": rng}
    aux_shapes = jax.eval_shape(
        lambda p: _terms(loss_terms(p, first, **inputs, **keyed))[2], params
    )
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    aux0 = {k: jnp.zeros(v.shape, jnp.float32) for k, v in aux_shapes.items()}
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), aux0)
    (grads, total, count, aux), _ = jax.lax.scan(one, init, (jnp.arange(micro_batches), micro))
    denominator = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grads, params)
    return grads, total / denominator, count, {k: v / denominator for k, v in aux.items()}


def make_train_step(
    loss_terms: LossTerms,
    optimizer: optax.GradientTransformation,
    micro_batches: int = 1,
    needs_rng: bool = False,
    *,
    uses_frozen: bool = False,
    uses_extras: bool = False,
    update_extras: UpdateExtras | None = None,
) -> Callable[..., tuple[TrainState, dict[str, Array]]]:
    """A jitted `(state, batch[, frozen]) -> (state, metrics)` step.

    `needs_rng` passes the loss `key=`, `uses_frozen` passes `frozen=` (the step's third argument),
    `uses_extras` passes `extras=state.extras`; `update_extras` gives the next extras after the
    optimizer step. Metrics: loss, tokens, grad_norm, finite, and the loss's aux means.
    """

    def step(
        state: TrainState, batch: Batch, frozen: Any = None
    ) -> tuple[TrainState, dict[str, Array]]:
        keys = jax.random.split(jax.random.wrap_key_data(state.rng))
        inputs: dict[str, Any] = {}
        if uses_frozen:
            inputs["frozen"] = frozen
        if uses_extras:
            inputs["extras"] = state.extras
        grads, loss, tokens, aux = accumulated_gradients(
            loss_terms, state.params, batch, micro_batches, keys[1] if needs_rng else None, inputs
        )
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        extras = state.extras
        if update_extras is not None:
            extras = update_extras(state.extras, params, aux, frozen)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        rng = jax.random.key_data(keys[0])
        stepped = TrainState(params, opt_state, state.step + 1, rng, extras)
        # A non-finite step changes nothing, so the last good state (and checkpoint) survive.
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), stepped, state)
        metrics = dict(aux, loss=loss, tokens=tokens, grad_norm=grad_norm, finite=finite)
        return new_state, metrics

    return jax.jit(step, donate_argnums=0)


def ema_update(anchor: Params, params: Params, rate: float | Array) -> Params:
    """anchor <- (1 - rate)·anchor + rate·params, in the anchor's dtypes (an EMA anchor)."""
    return jax.tree.map(
        lambda a, p: ((1.0 - rate) * a.astype(jnp.float32) + rate * p.astype(jnp.float32)).astype(
            a.dtype
        ),
        anchor,
        params,
    )
