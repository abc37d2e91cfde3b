"""Chunked log-probabilities equal the full log-softmax; the SFT sum ignores prompt labels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain.losses import chunked_token_log_probs, masked_nll_sum, sequence_token_log_probs
from posttrain.models import forward, get_preset, init_params

CONFIG = get_preset("tiny_gemma2", vocab_size=500)  # not a multiple of the chunk


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_log_probs_and_gradients_equal_full_softmax(softcap):
    keys = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(keys[0], (37, 16))
    embedding = jax.random.normal(keys[1], (520, 16)) * 0.5  # 20 padding rows never scored
    targets = jax.random.randint(keys[2], (37,), 0, 500)

    def full(h, e):
        logits = h @ e[:500].T
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        return jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], 1)[:, 0]

    def chunked(h, e):
        return chunked_token_log_probs(h, e, targets, 500, softcap, chunk_size=64)

    np.testing.assert_allclose(chunked(hidden, embedding), full(hidden, embedding), atol=1e-5)
    grads_full = jax.grad(lambda h, e: full(h, e).sum(), argnums=(0, 1))(hidden, embedding)
    grads_chunked = jax.grad(lambda h, e: chunked(h, e).sum(), argnums=(0, 1))(hidden, embedding)
    for a, b in zip(grads_chunked, grads_full, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_sequence_log_probs_equal_the_model_forward():
    params = init_params(CONFIG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 20), 3, CONFIG.vocab_size)
    got = sequence_token_log_probs(CONFIG, params, tokens[:, :-1], tokens[:, 1:], chunk_size=128)
    logits = jax.jit(forward, static_argnums=0)(CONFIG, params, tokens[:, :-1])
    log_probs = jax.nn.log_softmax(logits, -1)
    expected = jnp.take_along_axis(log_probs, tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_masked_sum_ignores_labels_outside_the_mask_bitwise():
    params = init_params(CONFIG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 3, CONFIG.vocab_size)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = jnp.zeros((2, 15), bool).at[:, 9:].set(True)  # the answer: the last 6 targets
    scrambled = targets.at[:, :9].set(jax.random.randint(jax.random.key(2), (2, 9), 0, 500))
    assert not jnp.array_equal(scrambled, targets)
    first = masked_nll_sum(sequence_token_log_probs(CONFIG, params, inputs, targets), mask)
    second = masked_nll_sum(sequence_token_log_probs(CONFIG, params, inputs, scrambled), mask)
    assert float(first[1]) == 12.0 and float(first[0]) > 0
    assert np.asarray(first[0]).tobytes() == np.asarray(second[0]).tobytes()
    # A label inside the mask does change it.
    changed = targets.at[0, 12].set((targets[0, 12] + 1) % 500)
    third = masked_nll_sum(sequence_token_log_probs(CONFIG, params, inputs, changed), mask)
    assert float(third[0]) != float(first[0])
