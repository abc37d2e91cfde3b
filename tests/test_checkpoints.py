"""Checkpoint formats: official Flax/Orbax layout, HF export round trip, and strict errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from posttrain.checkpoints import CheckpointError, load_hf, load_official, save_hf, save_official
from posttrain.checkpoints.official import params_from_official, params_to_official
from posttrain.models import forward, get_preset, init_params

_forward = jax.jit(forward, static_argnums=0)
TOLERANCE = dict(atol=1e-5, rtol=1e-6)


def _random_params(config, seed=0):
    params = init_params(config, jax.random.key(seed))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x + 0.3 * jax.random.normal(jax.random.key(seed + 1), x.shape)
            if "norm" in jax.tree_util.keystr(path)
            else x
        ),
        params,
    )


@pytest.mark.parametrize(
    ("preset", "transpose_gating"),
    [("tiny_gemma1", False), ("tiny_gemma2", False), ("tiny_gemma2", True)],
)
def test_official_orbax_layout_round_trip(tmp_path, preset, transpose_gating):
    # Official checkpoints carry 128 padding rows; the loader keeps them and never scores them.
    config = get_preset(preset, embed_padding=128)
    params = _random_params(config)
    save_official(params, config, tmp_path / "ckpt", transpose_gating=transpose_gating)
    loaded_config, loaded = load_official(tmp_path / "ckpt", get_preset(preset))
    assert loaded_config.embed_padding == 128
    assert loaded["embedder"]["input_embedding"].shape == (
        config.vocab_size + 128,
        config.embed_dim,
    )
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, config.vocab_size)
    expected = _forward(config, params, tokens)
    got = _forward(loaded_config, jax.tree.map(jnp.asarray, loaded), tokens)
    assert got.shape[-1] == config.vocab_size
    np.testing.assert_allclose(got, expected, **TOLERANCE)


def test_official_mha_uses_fused_qkv():
    config = get_preset("tiny_gemma1", num_kv_heads=4)
    official = params_to_official(init_params(config, jax.random.key(0)), config)
    assert official["transformer/layer_0/attn/qkv_einsum"]["w"].shape == (3, 4, 64, 16)
    assert "transformer/layer_0/attn/q_einsum" not in official


def test_official_bare_mlp_arrays_are_accepted():
    # The gemma library's param_remapper drops the 'w' level of the MLP weights.
    config = get_preset("tiny_gemma2")
    official = params_to_official(init_params(config, jax.random.key(0)), config)
    for key in list(official):
        if key.endswith(("gating_einsum", "linear")):
            official[key] = official[key]["w"]
    _, params = params_from_official(official, config)
    assert params["layer_0"]["mlp"]["gating_einsum"].shape == (2, 64, 128)


def test_official_wrong_shape_is_named():
    config = get_preset("tiny_gemma2")
    official = params_to_official(init_params(config, jax.random.key(0)), config)
    official["transformer/layer_2/attn/q_einsum"]["w"] = np.zeros((4, 64, 8), np.float32)
    with pytest.raises(CheckpointError, match=r"layer_2/attn/q_einsum/w.*\(4, 64, 8\)"):
        params_from_official(official, config)


def test_official_missing_and_extra_are_named():
    config = get_preset("tiny_gemma2")
    official = params_to_official(init_params(config, jax.random.key(0)), config)
    del official["transformer/layer_1/post_ffw_norm"]
    with pytest.raises(CheckpointError, match="missing layer_1/post_ffw_norm/scale"):
        params_from_official(dict(official), config)
    official = params_to_official(init_params(config, jax.random.key(0)), config)
    official["transformer/layer_9/pre_ffw_norm"] = {"scale": np.zeros(64, np.float32)}
    with pytest.raises(CheckpointError, match="unexpected tensor layer_9/pre_ffw_norm"):
        params_from_official(official, config)


@pytest.mark.parametrize("preset", ["tiny_gemma1", "tiny_gemma2"])
def test_export_loads_in_transformers_with_same_logits(tmp_path, preset):
    config = get_preset(preset, embed_padding=128)  # padding rows must not be exported
    params = _random_params(config)
    save_hf(config, params, tmp_path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    reference.eval()
    tokens = np.random.default_rng(0).integers(3, config.vocab_size, size=(2, 20))
    with torch.no_grad():
        expected = reference(torch.as_tensor(tokens)).logits.numpy()
    got = np.asarray(_forward(config, params, jnp.asarray(tokens)))
    assert np.abs(got - expected).max() <= 1e-4
    # And back: load_hf gives the same tree, padding rows aside.
    loaded_config, loaded = load_hf(tmp_path)
    assert loaded_config == config.replace(embed_padding=0)
    expected_tree = jax.tree.map(np.asarray, params)
    expected_tree["embedder"]["input_embedding"] = expected_tree["embedder"]["input_embedding"][
        : config.vocab_size
    ]
    jax.tree.map(np.testing.assert_array_equal, loaded, expected_tree)


def test_export_bfloat16(tmp_path):
    config = get_preset("tiny_gemma2")
    save_hf(config, init_params(config, jax.random.key(0)), tmp_path, dtype="bfloat16")
    loaded_config, loaded = load_hf(tmp_path)
    assert loaded_config.param_dtype == "bfloat16"
    assert loaded["layer_0"]["mlp"]["linear"].dtype == jnp.bfloat16
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"


def _tamper(tmp_path, change):
    from safetensors.numpy import load_file, save_file

    config = get_preset("tiny_gemma2")
    save_hf(config, init_params(config, jax.random.key(0)), tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))


def test_hf_wrong_shape_is_named(tmp_path):
    def change(t):
        t["model.layers.1.mlp.up_proj.weight"] = np.zeros((100, 64), np.float32)

    _tamper(tmp_path, change)
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj.weight.*\(100, 64\)"):
        load_hf(tmp_path)


def test_hf_missing_tensor_is_named(tmp_path):
    _tamper(tmp_path, lambda t: t.pop("model.layers.3.post_feedforward_layernorm.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing.*model.layers.3.post_feedforward_layernorm"
    ):
        load_hf(tmp_path)


def test_hf_extra_tensor_is_named(tmp_path):
    def change(t):
        t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)

    _tamper(tmp_path, change)
    with pytest.raises(CheckpointError, match=r"unexpected.*model.layers.0.self_attn.q_proj.bias"):
        load_hf(tmp_path)


def test_hf_untied_lm_head_is_rejected(tmp_path):
    def change(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"] + 1.0

    _tamper(tmp_path, change)
    with pytest.raises(CheckpointError, match=r"lm_head\.weight"):
        load_hf(tmp_path)


def test_hf_pickle_only_directory_is_refused(tmp_path):
    from posttrain.checkpoints.huggingface import config_to_hf

    hf_config = config_to_hf(get_preset("tiny_gemma2"), "float32")
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="pickled"):
        load_hf(tmp_path)


def test_config_missing_field_is_named(tmp_path):
    from posttrain.checkpoints.huggingface import config_from_hf, config_to_hf

    hf_config = config_to_hf(get_preset("tiny_gemma2"), "float32")
    del hf_config["intermediate_size"]
    with pytest.raises(CheckpointError, match="intermediate_size"):
        config_from_hf(hf_config)


def test_rope_parameters_config_is_accepted():
    from posttrain.checkpoints.huggingface import config_from_hf, config_to_hf

    hf = config_to_hf(get_preset("gemma2_9b"), "bfloat16")
    hf.pop("rope_theta")
    hf["rope_parameters"] = {"rope_theta": 12345.0, "rope_type": "default"}
    config = config_from_hf(hf)
    assert config.rope_base == 12345.0
    assert config.query_scale == pytest.approx(256**-0.5)
    assert config.layer_types[:2] == ("local", "global")
