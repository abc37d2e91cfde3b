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


def _pairs(n: int = 16, length: int = 24):
    """Preference pairs with a shared prompt of 10 tokens and answers of unequal lengths."""
    from posttrain.data.preferences import PreferenceRows

    rng = np.random.default_rng(1)
    chosen = rng.integers(3, CONFIG.vocab_size, (n, length)).astype(np.int32)
    rejected = chosen.copy()
    rejected[:, 10:] = rng.integers(3, CONFIG.vocab_size, (n, length - 10))
    chosen_segments = np.ones((n, length), np.int32)
    rejected_segments = np.ones((n, length), np.int32)
    for i in range(n):
        chosen_segments[i, 14 + i % 8 :] = 0
        rejected_segments[i, 12 + (3 * i) % 10 :] = 0
    chosen *= chosen_segments
    rejected *= rejected_segments
    margin = np.zeros(n, np.float32)
    label = np.ones(n, np.float32)
    return PreferenceRows(chosen, chosen_segments, rejected, rejected_segments, margin, label)


def _warm_members(tmp_path, mesh: dict[str, int]):
    from posttrain.rewards.reward_model import init_head
    from posttrain.rewards.warm import average_weights
    from posttrain.stages.kit import StageContext
    from posttrain.stages.reward import RewardConfig, train_reward_model
    from posttrain.train.optim import OptimConfig

    name = "_".join(f"{k}{v}" for k, v in mesh.items())
    ctx = StageContext.standalone(tmp_path / name, "warm", mesh=mesh)
    # eps = 1 keeps Adam's update smooth in the gradient (g / (sqrt(v) + 1)), so last-bit
    # differences of the sharded reductions stay last-bit differences in the parameters.
    optim = OptimConfig(lr=0.5, eps=1.0, schedule="constant", total_steps=3, clip_norm=None)
    members = []
    for index in range(2):  # members differ by seed (data order, dropout masks)
        stage = RewardConfig(
            init_checkpoint="", train="", batch_size=8, steps=3, save_every=0,
            dropout=0.1, seed=index,
        )  # fmt: skip
        params = {"backbone": init_params(CONFIG, jax.random.key(0)), "head": init_head(CONFIG)}
        params["head"]["w"] = params["head"]["w"] + 0.01
        result = train_reward_model(
            ctx, CONFIG, params, _pairs(), stage, optim, ctx.run_dir / f"m{index}", f"m{index}"
        )
        assert int(result.state.step) == 3
        members.append(jax.tree.map(np.asarray, result.state.params))
    return members, average_weights(members)


def test_reward_and_warm_training_on_the_mesh_equal_one_device(tmp_path):
    # Given two WARM members (dropout 0.1, seeds 0 and 1) trained by the reward stage's own training
    # function on one device, and on a 4-way FSDP x 2-way tensor mesh of 8 devices,
    single, single_average = _warm_members(tmp_path, {"data": 1, "fsdp": 1, "tensor": 1})
    sharded, sharded_average = _warm_members(tmp_path, {"data": 1, "fsdp": 4, "tensor": 2})
    # then every member's parameters and the weight average agree to 1e-5,
    for a, b in zip(single, sharded, strict=True):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(x, y, atol=1e-5)
    for x, y in zip(jax.tree.leaves(single_average), jax.tree.leaves(sharded_average), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
    # and training moved the parameters well beyond that tolerance.
    start = init_params(CONFIG, jax.random.key(0))
    moved = max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max())
        for x, y in zip(jax.tree.leaves(single[0]["backbone"]), jax.tree.leaves(start), strict=True)
    )
    assert moved > 1e-3


def test_reinforce_step_on_the_mesh_equals_one_device(tmp_path):
    # Given one batch of rollouts of a tiny policy (prompts of random ids, a reward on length),
    import types

    from posttrain.rl.rollouts import RolloutSource
    from posttrain.sampling import SamplingConfig
    from posttrain.stages.reinforce import ReinforceConfig, reinforce_loss_terms

    class Tokens:
        vocab_size = CONFIG.vocab_size

        def encode_chat(self, turns, add_generation_prompt=True):
            return [2, *(3 + (ord(c) % 200) for c in turns[-1]["content"])]

        def decode(self, ids):
            return " ".join(str(i) for i in ids)

    def reward(prompts, responses):
        return np.asarray([len(r) % 7 for r in responses], np.float32)

    params = init_params(CONFIG, jax.random.key(0))
    source = RolloutSource(
        CONFIG, Tokens(), [f"prompt {i}" for i in range(8)], reward,
        SamplingConfig(max_new_tokens=6, stop_ids=(1,)), 4, 2, lambda state: state.params,
    )  # fmt: skip
    batch = source.next_batch(types.SimpleNamespace(params=params))
    stage = ReinforceConfig(init_checkpoint="", prompts="", reward="", samples_per_prompt=2)
    loss_terms = reinforce_loss_terms(CONFIG, stage)
    # A small SGD step: the parameter change is 0.01·gradient, compared at 1e-5.
    optimizer = optax.sgd(0.01)
    step = make_train_step(loss_terms, optimizer, uses_extras=True)
    extras = {"baseline": np.zeros((), np.float32)}
    expected, expected_metrics = step(
        init_state(jax.tree.map(lambda x: x.copy(), params), optimizer, 0, extras), batch
    )
    # when the same step runs with FSDP x tensor parallelism over 8 devices,
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    sharded = shard_params(params, param_logical_axes(CONFIG), mesh)
    with activation_sharding(mesh):
        got, got_metrics = make_train_step(loss_terms, optimizer, uses_extras=True)(
            place_on_mesh(init_state(sharded, optimizer, 0, extras), mesh), shard_batch(batch, mesh)
        )
    # then the loss and RL metrics agree to 1e-5 (relative) and the parameters to 1e-5.
    for key in ("loss", "reward", "kl_k1", "sampler_gap", "grad_norm"):
        np.testing.assert_allclose(
            float(got_metrics[key]), float(expected_metrics[key]), rtol=1e-5, atol=1e-5
        )
    assert float(expected_metrics["grad_norm"]) > 1e-3
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(expected.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
