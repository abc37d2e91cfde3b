"""Each backbone (tiny Gemma 2, tiny RecurrentGemma) through the one interface of
`posttrain.models.backbone`: prefill + decode equals the forward, decoding states reorder and
repeat by rows, abstract shapes and logical axes match the parameters, the sampler's log-probs
are the training forward's, beam search finds the forward's best hypothesis, HF directories
round-trip by their model_type, and dispatch leaves the compiled graph as the family's own."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from posttrain.checkpoints import load_hf, save_hf
from posttrain.checkpoints.huggingface import config_from_hf, config_to_hf
from posttrain.config_store import model_config_from_node, preset_node
from posttrain.losses.log_probs import sequence_token_log_probs
from posttrain.models import backbone as bb
from posttrain.models import transformer
from posttrain.rl.rollouts import training_rows
from posttrain.sampling import beam_search
from posttrain.sampling.sampler import generate, left_pad
from posttrain.sharding import DEFAULT_RULES

# Float32 logits of magnitude ~10: a few ulps of relative rounding on top of 1e-5.
TOLERANCE = dict(atol=1e-5, rtol=1e-6)
PADS, WIDTH, PROMPT = (3, 9), 20, 12  # two left-padded rows, both longer than the window (8)

_forward = jax.jit(bb.forward, static_argnums=0)
_prefill = jax.jit(bb.prefill, static_argnums=(0, 4))
_step = jax.jit(bb.decode_step, static_argnums=0)


@pytest.fixture(scope="module", params=["tiny_gemma2", "tiny_recurrentgemma"])
def model(request):
    """(config, params) of a tiny model with non-zero norm scales (every norm exercised)."""
    config = bb.get_preset(request.param)
    params = bb.init_params(config, jax.random.key(1))
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x + 0.3 * jax.random.normal(jax.random.key(len(str(path))), x.shape)
            if "norm" in jax.tree_util.keystr(path)
            else x
        ),
        params,
    )
    return config, params


def _padded_rows(config):
    """Tokens and segment ids [2, WIDTH], left-padded by PADS."""
    rng = np.random.default_rng(0)
    tokens = np.zeros((2, WIDTH), np.int32)
    segments = np.zeros((2, WIDTH), np.int32)
    for row, pad in enumerate(PADS):
        tokens[row, pad:] = rng.integers(3, config.vocab_size, WIDTH - pad)
        segments[row, pad:] = 1
    return jnp.asarray(tokens), jnp.asarray(segments)


def _decode_from(config, params, state, tokens, positions, weights):
    """Logits [b, n, v] of feeding tokens [b, n] one by one after `state`."""
    steps = []
    for t in range(tokens.shape[1]):
        logits, state = _step(
            config, params, tokens[:, t : t + 1], positions[:, t : t + 1], state, weights
        )
        steps.append(logits)
    return jnp.concatenate(steps, axis=1), state


def test_prefill_then_decode_equals_forward(model):
    # Given left-padded rows longer than the window, the first PROMPT columns prefilled.
    config, params = model
    tokens, segments = _padded_rows(config)
    positions = transformer.positions_from_segments(segments)
    expected = _forward(config, params, tokens, None, segments)
    # When the rest is decoded one token at a time from the prefill's state,
    logits, state = _prefill(config, params, tokens[:, :PROMPT], segments[:, :PROMPT], WIDTH)
    weights = bb.decode_weights(config, params)
    decoded, _ = _decode_from(
        config, params, state, tokens[:, PROMPT:], positions[:, PROMPT:], weights
    )
    # then every real token's logits are the forward's.
    got = jnp.concatenate([logits, decoded], axis=1)
    real = np.asarray(segments) > 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(expected)[real], **TOLERANCE)


def test_state_rows_reorder_and_repeat(model):
    config, params = model
    tokens, segments = _padded_rows(config)
    positions = transformer.positions_from_segments(segments)
    _, state = _prefill(config, params, tokens[:, :PROMPT], segments[:, :PROMPT], WIDTH)
    rest, rest_positions = tokens[:, PROMPT:], positions[:, PROMPT:]
    weights = bb.decode_weights(config, params)
    straight, _ = _decode_from(config, params, state, rest, rest_positions, weights)
    # Swapped rows decode the swapped continuations to the swapped logits, bit for bit.
    swapped = bb.select_rows(config, state, jnp.array([1, 0]))
    got, _ = _decode_from(config, params, swapped, rest[::-1], rest_positions[::-1], weights)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(straight)[::-1])
    # Repeating each row twice is selecting rows 0, 0, 1, 1; the copies decode independently.
    repeated = bb.repeat_rows(config, state, 2)
    picked = bb.select_rows(config, state, jnp.array([0, 0, 1, 1]))
    assert jax.tree.structure(repeated) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(repeated), jax.tree.leaves(picked), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    got, _ = _decode_from(
        config, params, repeated, rest.repeat(2, 0), rest_positions.repeat(2, 0), weights
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(straight).repeat(2, 0))


def test_abstract_shapes_match_init_and_prefill(model):
    config, params = model
    abstract = bb.abstract_params(config)
    assert jax.tree.structure(abstract) == jax.tree.structure(params)
    for shape, leaf in zip(jax.tree.leaves(abstract), jax.tree.leaves(params), strict=True):
        assert (shape.shape, shape.dtype) == (leaf.shape, leaf.dtype)
    # A prefill's state has the shapes of an empty one of the same rows and length.
    tokens, segments = _padded_rows(config)
    _, state = _prefill(config, params, tokens[:, :PROMPT], segments[:, :PROMPT], WIDTH)
    empty = bb.abstract_state(config, 2, WIDTH)
    assert jax.tree.structure(empty) == jax.tree.structure(state)
    for shape, leaf in zip(jax.tree.leaves(empty), jax.tree.leaves(state), strict=True):
        assert (shape.shape, shape.dtype) == (leaf.shape, leaf.dtype)


def test_logical_axes_cover_every_leaf(model):
    config, params = model
    axes = bb.param_logical_axes(config)
    specs = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, PartitionSpec))
    leaves = jax.tree.leaves(params)
    assert len(specs) == len(leaves)
    assert jax.tree.structure(
        jax.tree.map(lambda _: 0, axes, is_leaf=lambda x: isinstance(x, PartitionSpec))
    ) == jax.tree.structure(jax.tree.map(lambda _: 0, params))
    for spec, leaf in zip(specs, leaves, strict=True):
        assert len(spec) == leaf.ndim, (spec, leaf.shape)
        assert all(name is None or name in DEFAULT_RULES for name in spec), spec


def test_sampler_log_probs_equal_the_training_forward(model):
    # Given two left-padded prompts, two samples of each from one prefill,
    config, params = model
    prompts = [[2, 17, 30, 41, 5, 9, 11, 60, 7], [2, 33, 4]]
    tokens, segments = left_pad(prompts, 16)
    out = generate(
        config,
        params,
        jnp.asarray(tokens),
        jnp.asarray(segments),
        jax.random.key(3),
        jnp.float32(1.0),
        jnp.int32(0),
        jnp.float32(1.0),
        max_new_tokens=10,
        stop_ids=(1,),
        samples_per_prompt=2,
    )
    response, lengths, sampled = jax.device_get((out.tokens, out.lengths, out.model_log_probs))
    # when the rows are laid out for training and scored by the training forward,
    repeated = [p for p in prompts for _ in range(2)]
    rows, row_segments, mask, sampler = training_rows(repeated, response, lengths, sampled, 26)
    scored = sequence_token_log_probs(
        config, params, rows[:, :-1], rows[:, 1:], row_segments[:, :-1], 128
    )
    # then both give every response token the same log-probability.
    assert mask.sum() == lengths.sum() > 0
    gap = np.abs(np.where(mask, np.asarray(scored) - sampler, 0.0))
    assert gap.max() <= 1e-5, gap.max()


def test_beam_search_scores_its_hypotheses_as_the_forward_does(model):
    # Given 4 beams of 3 new tokens without stop ids (every hypothesis runs to the limit),
    config, params = model
    prompt = [2, 17, 30, 41]
    out = beam_search(config, params, [prompt], width=4, max_new_tokens=3, alpha=0.0, stop_ids=())
    assert out.tokens.shape == (1, 4, 3)
    assert np.all(np.diff(np.asarray(out.scores[0])) <= 0)  # best first
    assert len({tuple(row) for row in np.asarray(out.tokens[0]).tolist()}) == 4
    # then each one's log-probability is the forward's sum over its tokens.
    rows = jnp.asarray([prompt + row for row in np.asarray(out.tokens[0]).tolist()])
    log_probs = jax.nn.log_softmax(_forward(config, params, rows, None, None), axis=-1)
    targets = rows[:, len(prompt) :]
    picked = jnp.take_along_axis(log_probs[:, len(prompt) - 1 : -1], targets[..., None], -1)
    np.testing.assert_allclose(picked.sum(axis=(1, 2)), out.log_probs[0], atol=1e-4)


def test_hf_directory_round_trips_by_model_type(model, tmp_path):
    config, params = model
    save_hf(config, jax.tree.map(np.asarray, params), tmp_path)
    loaded_config, loaded = load_hf(tmp_path)
    assert loaded_config == config
    assert config_from_hf(config_to_hf(config, "float32")) == config
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_hydra_node_names_its_family(model):
    config, _ = model
    node = preset_node(config)
    assert node["family"] in bb.backbone_of(config).families
    assert model_config_from_node(node) == config


def test_dispatch_compiles_to_the_familys_own_graph():
    # The interface picks the implementation while tracing: a Gemma decode step through it is
    # the transformer's own decode step with the cache-size RoPE bound the sampler always used.
    config = bb.get_preset("tiny_gemma2")
    params = bb.abstract_params(config)
    state = bb.abstract_state(config, 2, 24)
    token = jax.ShapeDtypeStruct((2, 1), jnp.int32)

    def direct(p, tokens, positions, s):
        return transformer.decode_step(config, p, tokens, positions, s, position_bound=24)

    via = functools.partial(bb.decode_step, config)
    assert str(jax.make_jaxpr(via)(params, token, token, state)) == str(
        jax.make_jaxpr(direct)(params, token, token, state)
    )
