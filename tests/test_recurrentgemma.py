"""RecurrentGemma (Griffin): parity with transformers and (when importable) the official
`recurrentgemma` package, decoding against the full forward, and the preset sizes.

All rows are [2, 40] with a window of 8, so every jitted function compiles once per config.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import recurrentgemma_reference as ref
import transformers
from official_griffin import official_griffin, official_package

from posttrain.models import recurrentgemma as rg
from posttrain.models.recurrentgemma import huggingface as rg_hf
from posttrain.models.recurrentgemma.attention import sequence_attention
from posttrain.models.recurrentgemma.layers import linear_recurrence, sqrt_bounded_grad
from posttrain.models.transformer import positions_from_segments
from posttrain.sharding import DEFAULT_RULES, MeshConfig, make_mesh, shard_params, tree_shardings

TOL = 1e-4
B, T, PROMPT = 2, 40, 20
PADS = (5, 18)  # left padding of each row; 18 leaves a 2-token prompt, shorter than the conv
DOCS = (13, 17, 10)  # packed document lengths (sum T)


@functools.partial(jax.jit, static_argnums=0)
def _run(config, params, tokens, positions, segment_ids):
    out = rg.RecurrentGemma(config).apply({"params": params}, tokens, positions, segment_ids)
    return out.logits, out.hidden


_prefill = jax.jit(rg.prefill, static_argnums=0)
_decode = jax.jit(rg.decode_step, static_argnums=0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The transformers model, its directory, and our (config, params) loaded from it."""
    directory = tmp_path_factory.mktemp("recurrentgemma_hf")
    model = ref.make_reference(directory)
    config, params = rg_hf.load_hf(directory, window_semantics="hf")
    return model, directory, config, params


@pytest.fixture(scope="module")
def tokens():
    return np.random.RandomState(0).randint(1, ref.VOCAB, (B, T))


def _left_padded(tokens):
    """Rows of `tokens` left-padded by PADS (pad id 0, segment 0): (tokens, segment ids)."""
    out, segments = np.zeros_like(tokens), np.zeros_like(tokens)
    for row, pad in enumerate(PADS):
        out[row, pad:] = tokens[row, : T - pad]
        segments[row, pad:] = 1
    return out, segments


def _packed_segments():
    return np.repeat(np.arange(1, len(DOCS) + 1), DOCS)[None].repeat(B, 0)


def _ours(config, params, tokens, segments=None):
    segments = np.ones_like(tokens) if segments is None else segments
    positions = positions_from_segments(jnp.asarray(segments))
    logits, hidden = _run(config, params, jnp.asarray(tokens), positions, jnp.asarray(segments))
    return np.asarray(logits), np.asarray(hidden)


def _max_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_hf_parity_rows_longer_than_the_window(reference, tokens):
    # Given a random HF checkpoint loaded with HF window semantics, rows 5x the window.
    model, _, config, params = reference
    logits, hidden = _ours(config, params, tokens)
    # Then logits and final hidden states agree with transformers in float32.
    assert _max_diff(logits, ref.reference_logits(model, tokens)) <= TOL
    assert _max_diff(hidden, ref.reference_hidden(model, tokens)) <= TOL
    assert np.abs(logits).max() > 0.5  # the comparison is not between two near-zero arrays


def test_hf_parity_with_left_padding(reference, tokens):
    # Given left-padded rows (segment 0 = padding, as the attention mask says).
    model, _, config, params = reference
    padded, segments = _left_padded(tokens)
    logits, _ = _ours(config, params, padded, segments)
    # Then each row's real tokens score as transformers scores the row alone. (transformers'
    # own left-padded forward differs by ~0.3: its Conv1D reads the pad tokens.)
    for row, pad in enumerate(PADS):
        expected = ref.reference_logits(model, tokens[row : row + 1, : T - pad])[0]
        assert _max_diff(logits[row, pad:], expected) <= TOL


def test_packed_documents_score_as_separate_rows(reference, tokens):
    # transformers packs through position_ids but its Conv1D crosses documents, so the
    # reference is each document run on its own.
    model, _, config, params = reference
    logits, _ = _ours(config, params, tokens, _packed_segments())
    start = 0
    for length in DOCS:
        expected = ref.reference_logits(model, tokens[:, start : start + length])
        assert _max_diff(logits[:, start : start + length], expected) <= TOL
        start += length


def test_window_off_by_one_fails_the_same_harness(reference, tokens):
    # The official semantics (one more key) on the HF checkpoint: same harness, same tolerance.
    model, _, config, params = reference
    logits, _ = _ours(config.replace(window_semantics="official"), params, tokens)
    expected = ref.reference_logits(model, tokens)
    window = config.attention_window
    assert _max_diff(logits[:, :window], expected[:, :window]) <= TOL  # identical before W
    assert _max_diff(logits, expected) > 100 * TOL


def test_associative_scan_equals_sequential_loop(reference, tokens):
    _, _, config, params = reference
    config = config.replace(window_semantics="official")
    packed = _packed_segments()
    padded, segments = _left_padded(tokens)
    for toks, segs in ((tokens, packed), (padded, segments)):
        parallel, _ = _ours(config, params, toks, segs)
        loop, _ = _ours(config.replace(scan="sequential"), params, toks, segs)
        assert _max_diff(parallel, loop) <= 1e-5


@pytest.mark.parametrize("semantics", ["official", "hf"])
def test_decode_step_by_step_equals_forward(reference, tokens, semantics):
    # Given an empty state, feeding 40 tokens one by one wraps the 8-slot ring five times.
    _, _, config, params = reference
    config = config.replace(window_semantics=semantics)
    full, _ = _ours(config, params, tokens)
    state = rg.init_state(config, B)
    steps = []
    for t in range(T):
        position = jnp.full((B, 1), t, jnp.int32)
        logits, state = _decode(config, params, jnp.asarray(tokens[:, t : t + 1]), position, state)
        steps.append(np.asarray(logits[:, 0]))
    assert _max_diff(np.stack(steps, axis=1), full) <= TOL


@pytest.mark.parametrize("semantics", ["official", "hf"])
def test_prefill_then_decode_equals_forward(reference, tokens, semantics):
    # Given left-padded prompts (one longer than the window, one shorter than the conv).
    _, _, config, params = reference
    config = config.replace(window_semantics=semantics)
    padded, segments = _left_padded(tokens)
    full, _ = _ours(config, params, padded, segments)
    positions = positions_from_segments(jnp.asarray(segments))
    logits, state = _prefill(
        config,
        params,
        jnp.asarray(padded[:, :PROMPT]),
        positions[:, :PROMPT],
        jnp.asarray(segments[:, :PROMPT]),
    )
    real = segments[:, :PROMPT] > 0
    assert _max_diff(np.asarray(logits)[real], full[:, :PROMPT][real]) <= TOL
    steps = []
    for t in range(PROMPT, T):
        step, state = _decode(
            config, params, jnp.asarray(padded[:, t : t + 1]), positions[:, t : t + 1], state
        )
        steps.append(np.asarray(step[:, 0]))
    assert _max_diff(np.stack(steps, axis=1), full[:, PROMPT:]) <= TOL


def test_state_rows_reorder_and_repeat(reference, tokens):
    _, _, config, params = reference
    config = config.replace(window_semantics="official")
    positions = jnp.broadcast_to(jnp.arange(PROMPT), (B, PROMPT))
    prompt = jnp.asarray(tokens[:, :PROMPT])
    _, state = _prefill(config, params, prompt, positions, jnp.ones_like(prompt))
    step = (jnp.asarray(tokens[:, PROMPT : PROMPT + 1]), jnp.full((B, 1), PROMPT, jnp.int32))
    logits, _ = _decode(config, params, *step, state)
    swapped = rg.select_rows(state, jnp.array([1, 0]))
    swapped_logits, _ = _decode(config, params, step[0][::-1], step[1], swapped)
    assert _max_diff(swapped_logits, logits[::-1]) == 0.0
    repeated = rg.repeat_rows(state, 2)
    expected = rg.select_rows(state, jnp.array([0, 0, 1, 1]))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), repeated, expected))


def test_banded_attention_equals_full_scores():
    keys = jax.random.split(jax.random.key(0), 3)
    b, t, n, h = 2, 70, 2, 8
    query = jax.random.normal(keys[0], (b, t, n, h))
    k, v = (jax.random.normal(key, (b, t, h)) for key in keys[1:])
    docs = jnp.asarray(np.cumsum(np.isin(np.arange(t), [0, 23, 41]))[None].repeat(b, 0))
    attend = jax.jit(sequence_attention, static_argnums=(4, 5))
    for visible in (9, 17):  # 17: the block (16) is exactly visible - 1
        full = attend(query, k, v, docs, visible, None)
        banded = attend(query, k, v, docs, visible, 16)
        assert _max_diff(full, banded) <= 1e-6


def test_gradients_through_the_parallel_scan_equal_the_loop():
    # Training differentiates the associative scan; its values and gradients must be the loop's.
    keys = jax.random.split(jax.random.key(0), 4)
    a = jax.nn.sigmoid(jax.random.normal(keys[0], (2, 33, 5)) + 2.0)
    a = a.at[:, 17].set(0.0)  # a document start
    x, h0, weight = (
        jax.random.normal(key, shape)
        for key, shape in zip(keys[1:], [(2, 33, 5), (2, 5), (2, 33, 5)], strict=True)
    )

    def run(method):
        loss = lambda a, x, h0: jnp.sum(weight * linear_recurrence(a, x, h0, method))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(a, x, h0)

    for got, want in zip(
        jax.tree.leaves(run("associative")), jax.tree.leaves(run("sequential")), strict=True
    ):
        assert _max_diff(got, want) <= 1e-5


def test_hf_export_round_trip(reference, tokens, tmp_path):
    # Exporting our tree gives a directory transformers loads to the same logits.
    model, _, config, params = reference
    rg_hf.save_hf(config, params, tmp_path)
    reloaded = transformers.RecurrentGemmaForCausalLM.from_pretrained(tmp_path).eval()
    assert (
        _max_diff(ref.reference_logits(reloaded, tokens), ref.reference_logits(model, tokens)) == 0
    )
    config2, params2 = rg_hf.load_hf(tmp_path, window_semantics="hf")
    assert config2 == config
    assert jax.tree.all(jax.tree.map(np.array_equal, params2, params))


def test_hf_config_of_the_2b_model_gives_the_preset():
    # Fields as transformers 4.x wrote them (rope_theta and partial_rotary_factor at the top,
    # torch_dtype); intermediate_size is 2 x the MLP branch width.
    hub = dict(
        model_type="recurrent_gemma",
        num_hidden_layers=26,
        hidden_size=2560,
        lru_width=2560,
        intermediate_size=15360,
        num_attention_heads=10,
        num_key_value_heads=1,
        attention_window_size=2048,
        block_types=["recurrent", "recurrent", "attention"],
        conv1d_width=4,
        logits_soft_cap=30.0,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        partial_rotary_factor=0.5,
        embeddings_scale_by_sqrt_dim=True,
        hidden_activation="gelu_pytorch_tanh",
        vocab_size=256000,
        torch_dtype="float32",
    )
    preset = rg.get_preset("recurrentgemma_2b")
    assert rg_hf.config_from_hf(hub) == preset
    assert rg_hf.config_from_hf(rg_hf.config_to_hf(preset, "float32")) == preset
    assert rg_hf.config_from_hf(hub, "hf").visible_keys == 2048 == preset.visible_keys - 1


def test_loader_rejects_multi_head_keys():
    hf_config = transformers.RecurrentGemmaConfig(**{**ref.FIELDS, "num_key_value_heads": 2})
    with pytest.raises(rg_hf.CheckpointError, match="multi-query"):
        rg_hf.config_from_hf(hf_config.to_dict())


def test_sharded_forward_matches_and_axes_use_gemma_rules(reference, tokens):
    _, _, config, params = reference
    axes = rg.param_logical_axes(config)
    assert jax.tree.structure(
        axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    ) == (jax.tree.structure(params))
    names = {
        n
        for spec in jax.tree.leaves(
            axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
        )
        for n in spec
    }
    assert names - {None} <= set(DEFAULT_RULES)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    sharded = shard_params(params, axes, mesh)
    assert tree_shardings(axes, params, mesh)  # every leaf gets a sharding
    expected, _ = _ours(config, params, tokens)
    got, _ = _ours(config, sharded, tokens)
    assert _max_diff(got, expected) <= 1e-5


def test_sqrt_gradient_is_bounded():
    grad = jax.grad(lambda x: sqrt_bounded_grad(x, 1000.0))(0.0)
    assert float(grad) == pytest.approx(1000.0)


# Parameter counts of the official package (recurrentgemma 1.0.1, `Griffin.init` under
# jax.eval_shape); the report's Table 1 rounds the 2B model to 2.7B total, 2.0B non-embedding.
OFFICIAL_COUNTS = {"recurrentgemma_2b": 2_682_862_080, "recurrentgemma_9b": 8_579_977_216}


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_preset_parameter_counts(name):
    config = rg.get_preset(name)
    assert rg.param_count(config) == OFFICIAL_COUNTS[name]
    if name == "recurrentgemma_2b":
        embedding = config.vocab_size * config.width
        assert round(embedding / 1e9, 1) == 0.7
        assert round((OFFICIAL_COUNTS[name] - embedding) / 1e9, 1) == 2.0
        assert config.embed_scale == 50.5


def test_official_package_parity(reference, tokens):
    # The official tree is ours, so the HF checkpoint's params feed the official model as is.
    common, official = official_package()
    _, _, config, params = reference
    config = config.replace(window_semantics="official")
    griffin = official_griffin(common, official, config)
    run = jax.jit(lambda p, t, pos: griffin.apply({"params": p}, t, pos, return_cache=False)[0])
    for segments in (np.ones_like(tokens), _packed_segments()):
        positions = positions_from_segments(jnp.asarray(segments))
        expected = run(params, jnp.asarray(tokens), positions)
        ours, _ = _ours(config, params, tokens, segments)
        assert _max_diff(ours, expected) <= TOL


def test_official_package_parameter_counts():
    common, official = official_package()
    for name, preset in (
        ("recurrentgemma_2b", common.Preset.RECURRENT_GEMMA_2B_V1),
        ("recurrentgemma_9b", common.Preset.RECURRENT_GEMMA_9B_V1),
    ):
        model = official.Griffin(common.GriffinConfig.from_preset(preset))
        zeros = jnp.zeros((1, 1), jnp.int32)
        shapes = jax.eval_shape(functools.partial(model.init, jax.random.key(0), zeros, zeros))
        assert sum(x.size for x in jax.tree.leaves(shapes)) == rg.param_count(rg.get_preset(name))
