"""Sequence-mode attention: its written-out gradient against autodiff of the plain formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain.models import Transformer, attention, get_preset, init_params
from posttrain.models.attention import MASK_VALUE, _attend, _attend_local, _TokenMeta, sequence_mask

B, T, N, K, H = 3, 12, 4, 2, 8


def plain_attention(query, keys, values, mask, cap):
    """softmax(cap·tanh(q·k / cap), masked) · v with query head i on kv head i // (N / K)."""
    groups = query.shape[2] // keys.shape[2]
    keys = jnp.repeat(keys, groups, axis=2)
    values = jnp.repeat(values, groups, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", query, keys)
    if cap is not None:
        logits = cap * jnp.tanh(logits / cap)
    logits = jnp.where(mask[:, None], logits, MASK_VALUE)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), values)


def inputs(scale: float = 1.0):
    """Random q, k, v and a mask with left padding (row 1) and a window of 5."""
    rng = np.random.default_rng(0)
    query, keys, values = (
        jnp.asarray(scale * rng.normal(size=shape), jnp.float32)
        for shape in ((B, T, N, H), (B, T, K, H), (B, T, K, H))
    )
    segment_ids = np.ones((B, T), np.int32)
    segment_ids[1, :4] = 0  # left padding: these queries see nothing
    return query, keys, values, jnp.asarray(segment_ids)


@pytest.mark.parametrize("cap", [50.0, None, 1000.0])
@pytest.mark.parametrize("window", [None, 5])
def test_attention_value_and_gradient_match_plain_formula(cap, window):
    query, keys, values, segment_ids = inputs()
    mask = sequence_mask(segment_ids, window)
    real = segment_ids > 0  # padding queries' outputs are ignored by every caller
    weight = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, N, H)), jnp.float32)

    def loss(fn):
        def f(q, k, v):
            out = fn(q, k, v, mask, cap)
            return jnp.sum(jnp.where(real[:, :, None, None], jnp.sin(out) * weight, 0.0))

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    (value, grads), (ref_value, ref_grads) = (
        loss(_attend)(query, keys, values),
        loss(plain_attention)(query, keys, values),
    )
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for grad, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cap", [50.0, 1000.0])
def test_logits_near_the_cap_stay_exact(cap):
    """Logits pinned near ±cap: unshifted exp up to 5e21 at cap 50, shifted above float32's
    range at cap 1000; both match the plain softmax."""
    query, keys, values, segment_ids = inputs(scale=30.0)
    mask = sequence_mask(segment_ids, None)
    out = _attend(query, keys, values, mask, cap)
    ref = plain_attention(query, keys, values, mask, cap)
    real = np.asarray(segment_ids > 0)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], rtol=1e-4, atol=1e-4)


def test_fully_masked_queries_give_zero_and_finite_gradients():
    query, keys, values, segment_ids = inputs()
    mask = sequence_mask(segment_ids, None)
    out = _attend(query, keys, values, mask, 50.0)
    np.testing.assert_array_equal(np.asarray(out)[1, :4], 0.0)
    grads = jax.grad(lambda q, k, v: jnp.sum(_attend(q, k, v, mask, 50.0)), argnums=(0, 1, 2))(
        query, keys, values
    )
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def local_inputs(branches: bool):
    """Rows with packing and left padding, or shared-prefix rows with prefixes of 0 to 9 tokens."""
    rng = np.random.default_rng(2)
    if branches:
        prefix = [0, 3, 9]
        chosen_length, rejected_length = [7, 12, 9], [5, 4, 13]
        t = 30
        segments = np.zeros((B, t), np.int32)
        positions = np.zeros((B, t), np.int32)
        branch_ids = np.zeros((B, t), np.int32)
        for i, (p, lc, lr) in enumerate(zip(prefix, chosen_length, rejected_length, strict=True)):
            rest = lr - p
            segments[i, : lc + rest] = 1
            positions[i, :lc] = np.arange(lc)
            positions[i, lc : lc + rest] = np.arange(p, lr)
            branch_ids[i, p:lc] = 1
            branch_ids[i, lc : lc + rest] = 2
    else:
        t = 29  # not a multiple of the block
        segments = np.ones((B, t), np.int32)
        segments[0, 11:] = 2  # two packed sequences
        segments[1, :6] = 0  # left padding
        positions = np.broadcast_to(np.arange(t), (B, t)).copy()
        branch_ids = None
    query, keys, values = (
        jnp.asarray(rng.normal(size=shape), jnp.float32)
        for shape in ((B, t, N, H), (B, t, K, H), (B, t, K, H))
    )
    rows = jnp.broadcast_to(jnp.arange(t), (B, t))
    meta = _TokenMeta(
        rows,
        jnp.asarray(segments),
        jnp.asarray(positions),
        None if branch_ids is None else jnp.asarray(branch_ids),
    )
    return query, keys, values, meta


@pytest.mark.parametrize("branches", [False, True])
@pytest.mark.parametrize(("window", "block"), [(4, 4), (4, 8), (5, 6), (1, 4)])
def test_blocked_local_attention_equals_masked_full_attention(branches, window, block):
    query, keys, values, meta = local_inputs(branches)
    mask = sequence_mask(meta.segments, window, meta.positions, meta.branches)
    real = np.asarray(meta.segments > 0)
    weight = jnp.asarray(np.random.default_rng(3).normal(size=query.shape), jnp.float32)

    def loss(fn):
        def f(q, k, v):
            out = fn(q, k, v)
            return jnp.sum(jnp.where(real[:, :, None, None], jnp.sin(out) * weight, 0.0))

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    full = loss(lambda q, k, v: _attend(q, k, v, mask, 50.0))(query, keys, values)
    local = loss(lambda q, k, v: _attend_local(q, k, v, 50.0, window, meta, block))(
        query, keys, values
    )
    np.testing.assert_allclose(local[0], full[0], rtol=1e-5, atol=1e-5)
    for grad, ref in zip(local[1], full[1], strict=True):
        np.testing.assert_allclose(grad, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_model_with_blocked_local_layers_matches_full_scores(monkeypatch, shared_prefix):
    """tiny_gemma2 (window 8) on 96-token rows takes the blocked path in its local layers;
    logits and parameter gradients equal those of full masked scores."""
    config = get_preset("tiny_gemma2")
    t = 96
    assert attention.local_block(config.sliding_window, t, np.ones(1) if shared_prefix else None)
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(4)
    tokens = jnp.asarray(rng.integers(3, config.vocab_size, (2, t)), jnp.int32)
    segments = np.ones((2, t), np.int32)
    kwargs = {}
    if shared_prefix:
        # Row 0: a 40-token prefix, continuations of 30 and 26; row 1: 0, 50 and 40, padded.
        positions, branches = np.zeros((2, t), np.int32), np.zeros((2, t), np.int32)
        for row, (p, rest1, rest2) in enumerate([(40, 30, 26), (0, 50, 40)]):
            positions[row, : p + rest1] = np.arange(p + rest1)
            positions[row, p + rest1 : p + rest1 + rest2] = np.arange(p, p + rest2)
            branches[row, p : p + rest1] = 1
            branches[row, p + rest1 : p + rest1 + rest2] = 2
            segments[row, p + rest1 + rest2 :] = 0
        kwargs = dict(positions=jnp.asarray(positions), branch_ids=jnp.asarray(branches))
    else:
        segments[0, 50:] = 2  # packed
        segments[1, :7] = 0  # left padding
    segments = jnp.asarray(segments)

    def run(params):
        out = Transformer(config).apply(
            {"params": params}, tokens, segment_ids=segments, compute_logits=True, **kwargs
        )
        real = (segments > 0)[..., None]
        return jnp.sum(jnp.where(real, jnp.sin(out.logits), 0.0)), out.logits

    blocked = jax.jit(jax.value_and_grad(run, has_aux=True))(params)
    monkeypatch.setattr(attention, "local_block", lambda *args: None)
    full = jax.jit(jax.value_and_grad(run, has_aux=True))(params)
    real = np.asarray(segments > 0)
    np.testing.assert_allclose(
        np.asarray(blocked[0][1])[real], np.asarray(full[0][1])[real], atol=2e-5
    )
    for grad, ref in zip(jax.tree.leaves(blocked[1]), jax.tree.leaves(full[1]), strict=True):
        # Summation order differs: compare relative to the gradient's size (entries up to ~600).
        assert np.linalg.norm(grad - ref) <= 1e-5 * np.linalg.norm(ref)
