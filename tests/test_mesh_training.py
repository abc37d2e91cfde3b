"""The SFT loss and a full train step on 8 simulated devices (FSDP, tensor parallel) equal the
single-device ones."""

import jax
import numpy as np
import optax
import pytest

from posttrain.data.sft import Rows
from posttrain.models import get_preset, init_params, param_logical_axes
from posttrain.sharding import (
    MeshConfig,
    activation_sharding,
    make_mesh,
    place_on_mesh,
    shard_batch,
    shard_params,
)
from posttrain.stages.sft import sft_loss_terms
from posttrain.train.step import init_state, make_train_step

CONFIG = get_preset("tiny_gemma2", num_heads=8, num_kv_heads=4, hidden_dim=256)
pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def _rows():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, CONFIG.vocab_size, (8, 24)).astype(np.int32)
    mask = np.zeros((8, 24), bool)
    mask[:, 12:] = True
    segments = np.ones((8, 24), np.int32)
    segments[:2, :4] = 0  # some padding
    return Rows(tokens, mask, segments)


@pytest.mark.parametrize(
    "mesh_config",
    [MeshConfig(data=1, fsdp=8, tensor=1), MeshConfig(data=2, fsdp=1, tensor=4)],
    ids=["fsdp8", "data2-tensor4"],
)
def test_sharded_loss_and_step_equal_single_device(mesh_config):
    params = init_params(CONFIG, jax.random.key(0))
    rows = _rows()
    loss_terms = sft_loss_terms(CONFIG, 128)
    # Plain SGD (lr 1) so the parameter change is the gradient itself; Adam's g / sqrt(v) would
    # amplify last-bit differences of near-zero gradients.
    optimizer = optax.sgd(1.0)
    step = make_train_step(loss_terms, optimizer, micro_batches=2)
    expected_loss = jax.jit(loss_terms)(params, rows)
    # The step donates its state, so give it a copy and keep `params` for the sharded run.
    copied = jax.tree.map(lambda x: x.copy(), params)
    expected_state, expected_metrics = step(init_state(copied, optimizer, 0), rows)

    mesh = make_mesh(mesh_config)
    sharded = shard_params(params, param_logical_axes(CONFIG), mesh)
    batch = shard_batch(rows, mesh)
    with activation_sharding(mesh):
        got_loss = jax.jit(loss_terms)(sharded, batch)
        got_state, got_metrics = make_train_step(loss_terms, optimizer, 2)(
            init_state(sharded, optimizer, 0), batch
        )
    assert len(sharded["layer_0"]["mlp"]["linear"].sharding.device_set) == 8
    np.testing.assert_allclose(float(got_loss[0]), float(expected_loss[0]), rtol=1e-5)
    np.testing.assert_allclose(
        float(got_metrics["loss"]), float(expected_metrics["loss"]), atol=1e-5
    )
    for a, b in zip(
        jax.tree.leaves(got_state.params), jax.tree.leaves(expected_state.params), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_sharded_step_compiles_once():
    # Counters and the RNG start on the default device unless placed; the step's outputs live on
    # the mesh, so without `place_on_mesh` the second call would compile the step again.
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    params = shard_params(init_params(CONFIG, jax.random.key(0)), param_logical_axes(CONFIG), mesh)
    optimizer = optax.adamw(1e-3)
    step = make_train_step(sft_loss_terms(CONFIG, 128), optimizer)
    state = place_on_mesh(init_state(params, optimizer, 0), mesh)
    batch = shard_batch(_rows(), mesh)
    compiles = []
    listener = lambda event, seconds, **_: compiles.append(event)  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with activation_sharding(mesh):
            for _ in range(3):
                state, metrics = step(state, batch)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert np.isfinite(float(metrics["loss"]))
    assert compiles.count("/jax/core/compile/backend_compile_duration") == 1
