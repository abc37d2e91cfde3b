"""A config and its parameters bundled into a callable: token ids [b, t] -> logits [b, t, v]."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from posttrain.models.backbone import BackboneConfig, forward
from posttrain.models.transformer import check_token_ids

Params = dict[str, Any]


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(
    config: BackboneConfig, params: Params, tokens: jax.Array, segment_ids: jax.Array | None
) -> jax.Array:
    return forward(config, params, tokens, None, segment_ids)


@dataclasses.dataclass
class Model:
    """A model of any backbone family ready to score tokens; `params` is a plain tree usable
    with `forward`."""

    config: BackboneConfig
    params: Params

    def __call__(self, tokens: Any, segment_ids: Any | None = None) -> jax.Array:
        """Float32 logits [b, t, v] for int token ids [b, t] (segment id 0 marks padding)."""
        # Checked on the host before the int32 cast, which would wrap an id past 2**31; inside
        # the jitted forward the ids are traced and the guard there cannot see them.
        check_token_ids(tokens, self.config.vocab_size, "Model")
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
        if segment_ids is not None:
            segment_ids = jnp.asarray(segment_ids, jnp.int32)
        return _jit_forward(self.config, self.params, tokens, segment_ids)
