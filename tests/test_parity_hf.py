"""Parity with transformers on tiny random checkpoints, and negative controls proving the
harness would notice the classic mistakes (window off by one, interleaved RoPE)."""

import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import CASES, VOCAB, make_reference, reference_logits

from posttrain.checkpoints import load_hf, load_hf_model
from posttrain.models import attention, forward

TOLERANCE = 1e-4
LENGTH = 24  # longer than the sliding window (8), so local layers really slide


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Each case's checkpoint directory, reference model and reference logits."""
    tokens = np.random.default_rng(0).integers(3, VOCAB, size=(2, LENGTH))
    out = {}
    for case in CASES:
        directory = tmp_path_factory.mktemp(case)
        model = make_reference(case, directory)
        out[case] = (directory, reference_logits(model, tokens))
    return tokens, out


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(references, case):
    tokens, refs = references
    directory, expected = refs[case]
    model = load_hf_model(directory)
    got = np.asarray(model(tokens))
    assert got.shape == expected.shape == (2, LENGTH, VOCAB)
    assert got.dtype == np.float32
    assert np.abs(got - expected).max() <= TOLERANCE
    # The comparison is not vacuous: logits vary by far more than the tolerance.
    assert expected.std() > 100 * TOLERANCE


def _max_error(directory, expected, tokens, **config_changes):
    config, params = load_hf(directory)
    config = config.replace(**config_changes)
    return float(np.abs(np.asarray(forward(config, params, jnp.asarray(tokens))) - expected).max())


@pytest.mark.parametrize("delta", [-1, 1])
def test_window_off_by_one_is_detected(references, delta):
    tokens, refs = references
    directory, expected = refs["gemma2"]
    error = _max_error(directory, expected, tokens, sliding_window=8 + delta)
    assert error > 100 * TOLERANCE


def test_all_global_is_detected(references):
    tokens, refs = references
    directory, expected = refs["gemma2"]
    assert _max_error(directory, expected, tokens, attention_pattern=("global",)) > 100 * TOLERANCE


def test_wrong_query_scale_is_detected(references):
    tokens, refs = references
    directory, expected = refs["gemma2_stress"]
    assert _max_error(directory, expected, tokens, query_pre_attn_scalar=None) > 100 * TOLERANCE


def _interleaved_rope(x, sin, cos):
    """RoPE rotating adjacent pairs (x0, x1), (x2, x3): the layout Gemma does not use."""
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


@pytest.mark.parametrize("case", ["gemma1_mqa", "gemma2"])
def test_interleaved_rope_is_detected(references, case, monkeypatch):
    tokens, refs = references
    directory, expected = refs[case]
    monkeypatch.setattr(attention, "apply_rope", _interleaved_rope)
    assert _max_error(directory, expected, tokens) > 100 * TOLERANCE
