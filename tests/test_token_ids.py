"""Out-of-range token ids fail loudly on the host and cost nothing under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain.models import Model, abstract_params, forward, get_preset
from posttrain.models.transformer import check_token_ids

CONFIG = get_preset("tiny_gemma2")  # vocab_size 512


@pytest.fixture(scope="module")
def params():
    # Shapes only: every call here fails, or is traced, before a weight is read.
    return abstract_params(CONFIG)


def test_check_names_the_largest_offending_id_and_the_vocab():
    tokens = np.array([[2, 600, 5], [513, 7, 1000]])
    with pytest.raises(ValueError, match=r"prompts: token id 1000 .*vocab_size=512.*3 of 6"):
        check_token_ids(tokens, 512, "prompts")


def test_check_names_a_negative_id_and_accepts_the_edges():
    with pytest.raises(ValueError, match=r"batch: token id -3 "):
        check_token_ids([[0, -1, -3]], 512, "batch")
    check_token_ids(np.array([[0, 511]]), 512, "batch")  # both ends of [0, vocab) are valid
    check_token_ids(np.zeros((2, 0), np.int32), 512, "batch")  # nothing to check
    with pytest.raises(ValueError, match="token id 512 "):
        check_token_ids(jnp.array([[511, 512]]), 512, "batch")  # device arrays are read back


def test_check_rejects_float_ids():
    with pytest.raises(ValueError, match="batch: token ids must be integers, got dtype float32"):
        check_token_ids(np.array([[1.0, 2.5]], np.float32), 512, "batch")


def test_check_adds_nothing_to_a_traced_graph():
    def guarded(tokens):
        check_token_ids(tokens, 4, "inside jit")
        return tokens

    jaxpr = jax.make_jaxpr(guarded)(jnp.array([[9, 10]]))  # out of range, but traced
    assert len(jaxpr.eqns) == 0


def test_eager_forward_raises_and_traced_forward_does_not(params):
    bad = jnp.array([[1, 2, 512]])
    with pytest.raises(ValueError, match=r"forward: token id 512 .*vocab_size=512"):
        forward(CONFIG, params, bad)
    shape = jax.eval_shape(lambda p, t: forward(CONFIG, p, t), params, bad)
    assert shape.shape == (1, 3, 512)


def test_model_call_checks_before_the_int32_cast(params):
    # 2**32 + 7 would wrap to the valid id 7 in int32; it must be named as given.
    tokens = np.array([[2, 2**32 + 7]], np.int64)
    with pytest.raises(ValueError, match=rf"Model: token id {2**32 + 7} .*vocab_size=512"):
        Model(CONFIG, params)(tokens)
