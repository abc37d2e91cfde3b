"""Prefill + single-step decode equals the full forward, past the sliding window and with left
padding; local layers keep only `window` cache slots."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain.models import (
    decode_step,
    decode_weights,
    forward,
    get_preset,
    init_params,
    positions_from_segments,
    prefill,
)

CONFIG = get_preset("tiny_gemma2", sliding_window=6, query_pre_attn_scalar=24)
GEMMA1 = get_preset("tiny_gemma1")
_prefill = jax.jit(prefill, static_argnums=(0, 4))
_step = jax.jit(decode_step, static_argnums=0)
_forward = jax.jit(forward, static_argnums=0)
# Float32 logits of magnitude ~15: allow a few ulps of relative rounding on top of 1e-5.
TOLERANCE = dict(atol=1e-5, rtol=1e-6)


@pytest.fixture(scope="module", params=["gemma2", "gemma1"])
def model(request):
    config = CONFIG if request.param == "gemma2" else GEMMA1
    params = init_params(config, jax.random.key(1))
    # Non-zero norm scales so that every norm is exercised.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x + 0.3 * jax.random.normal(jax.random.key(len(str(path))), x.shape)
            if "norm" in jax.tree_util.keystr(path)
            else x
        ),
        params,
    )
    return config, params


def _decode_all(config, params, tokens, segment_ids, prompt_length, cache_size, weights=None):
    """Prefill the first `prompt_length` tokens, then feed the rest one at a time."""
    positions = positions_from_segments(segment_ids)
    logits, cache = _prefill(
        config, params, tokens[:, :prompt_length], segment_ids[:, :prompt_length], cache_size
    )
    outputs = [logits]
    for t in range(prompt_length, tokens.shape[1]):
        token, position = tokens[:, t : t + 1], positions[:, t : t + 1]
        logits, cache = _step(config, params, token, position, cache, weights)
        outputs.append(logits)
    return jnp.concatenate(outputs, axis=1), cache


def test_decode_matches_forward_past_the_window(model):
    config, params = model
    tokens = jax.random.randint(jax.random.key(2), (2, 20), 3, config.vocab_size)
    segment_ids = jnp.ones_like(tokens)
    expected = _forward(config, params, tokens)
    got, cache = _decode_all(config, params, tokens, segment_ids, prompt_length=4, cache_size=24)
    np.testing.assert_allclose(got, expected, **TOLERANCE)
    assert int(cache.index) == 20


@pytest.mark.parametrize("heads", ["model", "mha"])
def test_decode_weights_give_the_same_logits(model, heads):
    # MHA checkpoints fuse q, k and v in one `qkv_einsum` weight: its own matrix layout.
    config, params = model
    if heads == "mha":
        config = config.replace(num_kv_heads=config.num_heads)
        params = init_params(config, jax.random.key(5))
    weights = jax.jit(decode_weights, static_argnums=0)(config, params)
    layer = weights["layer_0"]
    d, f = config.embed_dim, config.hidden_dim
    assert layer["mlp"]["matrix"].shape == (d, 2 * f)
    projections = {"qkv_einsum"} if heads == "mha" else {"q_einsum", "kv_einsum"}
    assert set(layer["attn"]) == projections | {"attn_vec_einsum"}
    tokens = jax.random.randint(jax.random.key(6), (2, 12), 3, config.vocab_size)
    segment_ids = jnp.ones_like(tokens)
    expected = _forward(config, params, tokens)
    got, _ = _decode_all(config, params, tokens, segment_ids, 4, cache_size=12, weights=weights)
    np.testing.assert_allclose(got, expected, **TOLERANCE)


def test_prefill_longer_than_window_then_decode(model):
    config, params = model
    tokens = jax.random.randint(jax.random.key(3), (2, 22), 3, config.vocab_size)
    segment_ids = jnp.ones_like(tokens)
    expected = _forward(config, params, tokens)
    got, _ = _decode_all(config, params, tokens, segment_ids, prompt_length=15, cache_size=22)
    np.testing.assert_allclose(got, expected, **TOLERANCE)


def test_left_padding_decode_matches_unpadded_rows(model):
    config, params = model
    rng = np.random.default_rng(4)
    lengths, total, prompt = [17, 11], 17, 9
    rows = [rng.integers(3, config.vocab_size, size=n) for n in lengths]
    tokens = np.zeros((2, total), np.int32)
    segment_ids = np.zeros((2, total), np.int32)
    for i, row in enumerate(rows):
        tokens[i, total - len(row) :] = row
        segment_ids[i, total - len(row) :] = 1
    got, _ = _decode_all(
        config, params, jnp.asarray(tokens), jnp.asarray(segment_ids), prompt, cache_size=total
    )
    for i, row in enumerate(rows):
        alone = _forward(config, params, jnp.asarray(row)[None])
        np.testing.assert_allclose(got[i, total - len(row) :], alone[0], **TOLERANCE)


def test_local_cache_is_window_sized():
    config = CONFIG
    params = init_params(config, jax.random.key(0))
    tokens = jnp.ones((3, 10), jnp.int32)
    _, cache = prefill(config, params, tokens, jnp.ones_like(tokens), cache_size=100)
    window, kv, head = config.sliding_window, config.num_kv_heads, config.head_dim
    for attn_type, layer in zip(config.layer_types, cache.layers, strict=True):
        slots = window if attn_type == "local" else 100
        assert layer.keys.shape == (3, kv, head, slots)
        assert layer.values.shape == (3, kv, slots, head)
    assert cache.local_positions.shape == (3, window)


def test_rope_table_equals_evaluated_sines():
    from posttrain.models.layers import MAX_ROPE_TABLE, rope_sin_cos, rope_tables

    positions = jnp.asarray([[0, 5, 511, 7], [3, 3, 200, 1]])
    expected = rope_tables(positions, 64, 10_000.0)
    read = jax.jit(lambda p: rope_sin_cos(p, 512, 64, 10_000.0))(positions)
    for got, want in zip(read, expected, strict=True):
        assert got.shape == want.shape == (2, 4, 1, 32)
        np.testing.assert_allclose(got, want, atol=1e-6)
    # Past the size limit the sines are evaluated, not tabled (no 2^20-entry constant).
    jaxpr = jax.make_jaxpr(lambda p: rope_sin_cos(p, MAX_ROPE_TABLE, 64, 10_000.0))(positions)
    assert "sin" in str(jaxpr) and "gather" not in str(jaxpr)
