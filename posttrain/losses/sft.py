"""Supervised fine-tuning loss: negative log-likelihood of the model turns.

Returned as a (sum, count) pair, not a mean: with gradient accumulation the trainer divides
the summed loss of every micro-batch by the global number of loss tokens, so unequal
micro-batches weigh each token equally (a mean of micro-batch means would not).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def masked_nll_sum(token_log_probs: Array, loss_mask: Array) -> tuple[Array, Array]:
    """(sum of -log p over masked tokens, number of masked tokens), both float32 scalars.

    `jnp.where` rather than a product: positions outside the mask contribute an exact 0, so
    whatever their labels, the sum is bitwise the same.
    """
    mask = loss_mask.astype(bool)
    total = -jnp.sum(jnp.where(mask, token_log_probs, 0.0))
    return total, jnp.sum(mask).astype(jnp.float32)
