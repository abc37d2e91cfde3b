"""The sharded forward on 8 simulated devices equals the single-device forward (1e-5)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from posttrain.models import forward, get_preset, init_params, param_logical_axes
from posttrain.sharding import (
    MeshConfig,
    activation_sharding,
    logical_to_spec,
    make_mesh,
    tree_shardings,
)

CONFIG = get_preset("tiny_gemma2", num_heads=8, num_kv_heads=4, hidden_dim=256)

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def _sharded_forward(mesh, params, tokens, segment_ids):
    param_shardings = tree_shardings(param_logical_axes(CONFIG), params, mesh)
    batch = NamedSharding(mesh, logical_to_spec(("act_batch", None), tokens.shape, mesh))
    params = jax.device_put(params, param_shardings)
    tokens, segment_ids = jax.device_put((tokens, segment_ids), batch)

    @functools.partial(jax.jit, in_shardings=(param_shardings, batch, batch))
    def run(p, t, s):
        with activation_sharding(mesh):
            return forward(CONFIG, p, t, segment_ids=s)

    return params, run(params, tokens, segment_ids)


@pytest.mark.parametrize(
    "mesh_config",
    [
        MeshConfig(data=1, fsdp=8, tensor=1),
        MeshConfig(data=2, fsdp=4, tensor=1),
        MeshConfig(data=1, fsdp=1, tensor=8),
        MeshConfig(data=2, fsdp=2, tensor=2),
    ],
    ids=["fsdp8", "data2-fsdp4", "tensor8", "2x2x2"],
)
def test_sharded_forward_equals_single_device(mesh_config):
    params = init_params(CONFIG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 24), 3, CONFIG.vocab_size)
    segment_ids = jnp.ones_like(tokens).at[:2, :5].set(0)  # some left padding
    expected = jax.jit(forward, static_argnums=0)(CONFIG, params, tokens, None, segment_ids)

    mesh = make_mesh(mesh_config)
    sharded_params, got = _sharded_forward(mesh, params, tokens, segment_ids)
    # The layout really is distributed: check one weight of each kind.
    q_spec = sharded_params["layer_0"]["attn"]["q_einsum"]["w"].sharding.spec
    if mesh_config.tensor > 1:
        assert q_spec[0] == "tensor"
    if mesh_config.fsdp > 1:
        assert q_spec[1] == "fsdp"
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=0)


def test_undivisible_axes_stay_replicated():
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    # One kv head (MQA) cannot be split four ways: that axis stays unsharded.
    spec = logical_to_spec((None, "kv_heads", "embed", "head_dim"), (2, 1, 64, 16), mesh)
    assert spec == PartitionSpec(None, None, "fsdp", None)
    spec = logical_to_spec(("act_batch", None), (6, 8), mesh)
    assert spec == PartitionSpec("fsdp", None)


def test_mesh_config_fills_minus_one():
    assert MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == (2, 2, 2)
    with pytest.raises(ValueError, match="devices"):
        MeshConfig(data=3, fsdp=-1, tensor=1).shape(8)
