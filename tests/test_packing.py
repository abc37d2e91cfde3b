"""Packed sequences (segment ids) never attend across documents."""

import jax
import jax.numpy as jnp
import numpy as np

from posttrain.models import forward, get_preset, init_params, positions_from_segments

CONFIG = get_preset("tiny_gemma2")
_forward = jax.jit(forward, static_argnums=0)


def test_packed_equals_separate():
    params = init_params(CONFIG, jax.random.key(0))
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, CONFIG.vocab_size, size=n) for n in (11, 5, 9)]
    tokens = np.concatenate([*docs, np.zeros(3, int)])[None]  # 3 trailing pad tokens
    segment_ids = np.concatenate(
        [np.full(len(d), i + 1) for i, d in enumerate(docs)] + [np.zeros(3)]
    )
    segment_ids = jnp.asarray(segment_ids[None], jnp.int32)
    packed = _forward(CONFIG, params, jnp.asarray(tokens), segment_ids=segment_ids)
    start = 0
    for doc in docs:
        alone = _forward(CONFIG, params, jnp.asarray(doc)[None])
        np.testing.assert_allclose(packed[0, start : start + len(doc)], alone[0], atol=1e-5, rtol=0)
        start += len(doc)


def test_positions_restart_per_segment():
    segment_ids = jnp.asarray([[0, 0, 1, 1, 1, 2, 2, 0]])
    np.testing.assert_array_equal(positions_from_segments(segment_ids), [[0, 0, 0, 1, 2, 0, 1, 0]])
