"""RecurrentGemma checkpoints besides the transformers parity: the official Orbax tree (written by
the official package when it is importable, else by our writer) loads wherever a policy path is
accepted and scores as the tree it was written from; a tree of other shapes fails naming the
tensor; exported HF directories keep their window semantics."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from official_griffin import official_griffin, official_package

from posttrain.checkpoints import CheckpointError, load_hf, load_policy, save_hf, save_official
from posttrain.models import recurrentgemma as rg
from posttrain.models.recurrentgemma import huggingface as rg_hf
from posttrain.models.recurrentgemma import official as rg_official
from posttrain.models.recurrentgemma.huggingface import WINDOW_SEMANTICS_KEY

B, T = 2, 24  # three times the tiny preset's window of 8


@pytest.fixture(scope="module")
def tiny():
    config = rg.get_preset("tiny_recurrentgemma")
    params = jax.tree.map(np.asarray, rg.init_params(config, jax.random.key(1)))
    tokens = np.random.RandomState(0).randint(1, config.vocab_size, (B, T))
    return config, params, tokens


def _logits(config, params, tokens):
    return np.asarray(jax.jit(rg.forward, static_argnums=0)(config, params, jnp.asarray(tokens)))


def test_official_package_checkpoint_loads_to_the_same_logits(tiny, tmp_path):
    # Given random tiny params from the official Griffin's own init, saved by its own writer.
    common, official = official_package()
    from recurrentgemma.jax import utils as official_utils

    config, _, tokens = tiny
    griffin = official_griffin(common, official, config)
    zeros = jnp.zeros((1, 1), jnp.int32)
    params = griffin.init(jax.random.key(3), zeros, zeros)["params"]
    official_utils.save_parameters(str(tmp_path / "ckpt"), params)
    # When it is loaded as a policy path with the preset (asked for HF's window, even),
    loaded_config, loaded = load_policy(tmp_path / "ckpt", config.replace(window_semantics="hf"))
    # then the window is the official one and it scores as the official model scores the tree.
    assert loaded_config == config
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    expected = griffin.apply({"params": params}, jnp.asarray(tokens), positions)[0]
    got = _logits(loaded_config, loaded, tokens)
    assert float(np.abs(got - np.asarray(expected)).max()) <= 1e-5
    assert np.abs(got).max() > 0.1


@pytest.mark.parametrize("wrapped", [True, False])
def test_our_official_checkpoint_loads_to_the_same_logits(tiny, tmp_path, wrapped):
    # Given our writer's checkpoint ({'params': tree}) or a bare tree written by plain Orbax,
    import orbax.checkpoint as ocp

    config, params, tokens = tiny
    if wrapped:
        save_official(params, config, tmp_path / "ckpt")
    else:
        ocp.PyTreeCheckpointer().save(tmp_path / "ckpt", params)
    # when loaded as a policy path, then the arrays are the saved ones and so are the logits.
    loaded_config, loaded = load_policy(tmp_path / "ckpt", config)
    assert loaded_config == config
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    expected = _logits(config, params, tokens)
    assert float(np.abs(_logits(config, loaded, tokens) - expected).max()) <= 1e-5


def test_bfloat16_config_reads_bfloat16_arrays(tiny, tmp_path):
    config, params, _ = tiny
    save_official(params, config, tmp_path / "ckpt")
    loaded_config, loaded = load_policy(tmp_path / "ckpt", config.replace(param_dtype="bfloat16"))
    assert {leaf.dtype for leaf in jax.tree.leaves(loaded)} == {jnp.dtype(jnp.bfloat16)}
    assert loaded_config.param_dtype == "bfloat16"


def test_the_tree_gives_the_architecture(tiny):
    config, params, _ = tiny
    found = rg_official.architecture_of({"params": params})
    assert found == {k: getattr(config, k) for k in found} and len(found) == 8


def test_a_2b_tree_with_the_9b_config_names_the_tensor_and_the_preset():
    # Shapes only (nothing allocated): the check runs on the checkpoint's metadata.
    tree = rg.abstract_params(rg.get_preset("recurrentgemma_2b"))
    with pytest.raises(CheckpointError) as error:
        rg_official.check_tree(tree, rg.get_preset("recurrentgemma_9b"))
    message = str(error.value)
    assert "blocks.0/channel_pre_norm/scale has shape (2560,), the config expects (4096,)" in (
        message
    )
    assert "num_layers=26" in message and "preset recurrentgemma_2b" in message


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"lru_width": 128}, r"blocks\.0/recurrent_block/conv_1d/b has shape \(96,\).*\(128,\)"),
        ({"num_layers": 7}, r"missing blocks\.6/.*num_layers=6"),
        ({"num_layers": 5}, r"unexpected tensor blocks\.5/"),
    ],
)
def test_a_checkpoint_of_other_shapes_fails_before_reading(tiny, tmp_path, change, match):
    config, params, _ = tiny
    save_official(params, config, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=match):
        load_policy(tmp_path / "ckpt", config.replace(**change))


def test_writer_refuses_a_tree_that_is_not_the_config(tiny, tmp_path):
    config, params, _ = tiny
    with pytest.raises(CheckpointError, match=r"unexpected tensor blocks\.5/"):
        save_official(params, config.replace(num_layers=5), tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("semantics", ["official", "hf"])
def test_exported_directory_keeps_its_window_semantics(tiny, tmp_path, semantics):
    # Given an export of a model with either semantics,
    config, params, _ = tiny
    config = config.replace(window_semantics=semantics)
    save_hf(config, params, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf[WINDOW_SEMANTICS_KEY] == semantics
    # then loading reads it back, and an explicit choice still wins.
    loaded_config, _ = load_hf(tmp_path)
    assert loaded_config == config
    other = "hf" if semantics == "official" else "official"
    assert rg_hf.load_hf(tmp_path, other)[0].window_semantics == other


def test_directory_without_the_key_loads_with_the_official_window(tiny, tmp_path):
    # A directory transformers wrote has no such key: the default is unchanged.
    config, params, _ = tiny
    save_hf(config.replace(window_semantics="hf"), params, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    del hf[WINDOW_SEMANTICS_KEY]
    (tmp_path / "config.json").write_text(json.dumps(hf))
    assert load_hf(tmp_path)[0].window_semantics == "official"
    hf[WINDOW_SEMANTICS_KEY] = "W+1"
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=WINDOW_SEMANTICS_KEY):
        load_hf(tmp_path)


def test_a_gemma_tree_with_a_recurrentgemma_config_says_what_it_holds(tmp_path):
    from posttrain.models import get_preset, init_params

    gemma = get_preset("tiny_gemma2")
    save_official(init_params(gemma, jax.random.key(0)), gemma, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"missing blocks\.0/.*'transformer/embedder'"):
        load_policy(tmp_path / "ckpt", rg.get_preset("tiny_recurrentgemma"))
