"""RoPE's table read keeps its bound honest: a position at or past the promised bound reads NaN,
never the clamped last entry, so a bound too small for the positions fed shows in the logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from posttrain.models import decode_step, get_preset, init_cache, init_params
from posttrain.models.layers import rope_sin_cos, rope_tables

CONFIG = get_preset("tiny_gemma2")


def test_positions_outside_the_table_read_nan_not_clamped_entries():
    bound = 12
    positions = jnp.asarray([[0, 5, bound - 1, bound, bound + 3, -1]])
    read = jax.jit(lambda p: rope_sin_cos(p, bound, 16, 10_000.0))(positions)
    expected = rope_tables(positions, 16, 10_000.0)
    for got, want in zip(read, expected, strict=True):
        assert got.shape == want.shape == (1, 6, 1, 8)
        np.testing.assert_allclose(got[:, :3], want[:, :3], atol=1e-6)
        # A clamping gather would have returned position 11's (or 0's) entries here.
        assert np.all(np.isnan(got[:, 3:]))


@functools.partial(jax.jit, static_argnames="bound")
def _decode_at(params, position, bound):
    cache = init_cache(CONFIG, 1, 8)
    token = jnp.full((1, 1), 8, jnp.int32)
    return decode_step(CONFIG, params, token, position, cache, position_bound=bound)[0]


def test_decode_step_with_a_bound_too_small_for_its_position_gives_nan_logits():
    # Given a token at position 5, a bound of 6 holds it; a bound of 5 is one too small and
    # must not pass unnoticed.
    params = init_params(CONFIG, jax.random.key(0))
    position = jnp.full((1, 1), 5, jnp.int32)
    assert np.all(np.isfinite(_decode_at(params, position, 6)))
    assert np.all(np.isnan(_decode_at(params, position, 5)))
