"""Official checkpoints restore onto any device set, in the config's parameter dtype."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from posttrain.checkpoints import CheckpointError, load_official, save_official
from posttrain.models import get_preset, init_params


def _save_sharded_over_last_four_devices(path, transpose_gating=False):
    # Devices 4..7 exclude device 0, where the loader puts things: the saver's device set and
    # the loader's differ even inside one process.
    config = get_preset("tiny_gemma2", embed_padding=128)
    params = init_params(config, jax.random.key(0))
    mesh = Mesh(np.array(jax.devices()[4:8]), ("fsdp",))

    def shard(x):
        spec = PartitionSpec("fsdp") if x.shape[0] % 4 == 0 else PartitionSpec()
        return jax.device_put(x, NamedSharding(mesh, spec))

    sharded = jax.tree.map(shard, params)
    assert len(sharded["embedder"]["input_embedding"].sharding.device_set) == 4
    save_official(sharded, config, path, transpose_gating=transpose_gating)
    return config, params


@pytest.mark.parametrize("transpose_gating", [False, True])
def test_sharded_checkpoint_lands_on_one_device_bitwise(tmp_path, transpose_gating):
    # Given a tree saved from a 4-device mesh,
    _, params = _save_sharded_over_last_four_devices(tmp_path / "ckpt", transpose_gating)
    # when loaded with no mesh at all,
    config, loaded = load_official(tmp_path / "ckpt", get_preset("tiny_gemma2"))
    # then every array sits on this process's first device with the saved bits.
    assert config.embed_padding == 128
    home = {jax.local_devices()[0]}
    for leaf in jax.tree.leaves(loaded):
        assert isinstance(leaf, jax.Array) and leaf.sharding.device_set == home
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_bfloat16_config_gets_bfloat16_params_on_the_given_sharding(tmp_path):
    _, params = _save_sharded_over_last_four_devices(tmp_path / "ckpt")
    replicated = NamedSharding(Mesh(np.array(jax.devices()[:2]), ("data",)), PartitionSpec())
    config = get_preset("tiny_gemma2", param_dtype="bfloat16")
    _, loaded = load_official(tmp_path / "ckpt", config, sharding=replicated)
    assert {leaf.dtype for leaf in jax.tree.leaves(loaded)} == {jnp.dtype(jnp.bfloat16)}
    assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(loaded))
    expected = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params)
    jax.tree.map(np.testing.assert_array_equal, loaded, expected)


def test_config_with_more_layers_names_the_missing_tensor(tmp_path):
    _save_sharded_over_last_four_devices(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="missing layer_4/"):
        load_official(tmp_path / "ckpt", get_preset("tiny_gemma2", num_layers=6))


def test_process_with_one_device_loads_a_four_device_checkpoint(tmp_path):
    # The failure this guards against: a process without the saver's devices at all.
    _, params = _save_sharded_over_last_four_devices(tmp_path / "ckpt")
    np.save(tmp_path / "expected.npy", np.asarray(params["layer_1"]["attn"]["q_einsum"]["w"]))
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from posttrain.checkpoints import load_official
        from posttrain.models import get_preset
        assert jax.device_count() == 1
        _, params = load_official({str(tmp_path / "ckpt")!r}, get_preset("tiny_gemma2"))
        got = np.asarray(params["layer_1"]["attn"]["q_einsum"]["w"])
        np.testing.assert_array_equal(got, np.load({str(tmp_path / "expected.npy")!r}))
        print("loaded", len(jax.tree.leaves(params)))
    """)
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["loaded", str(len(jax.tree.leaves(params)))]
