"""The per-device memory estimate and the check that refuses a run before it allocates."""

import logging
import time

import jax
import pytest

from posttrain.models import abstract_params, get_preset, init_cache
from posttrain.sharding import MeshConfig, make_mesh
from posttrain.train import memory
from posttrain.train.memory import (
    GIB,
    MEMORY_MARGIN,
    InsufficientMemoryError,
    MemoryEstimate,
    available_memory_bytes,
    check_fits,
    estimate_training_memory,
    kv_cache_bytes,
    tree_bytes,
)
from posttrain.train.optim import OptimConfig, make_optimizer

ADAMW = make_optimizer(OptimConfig(name="adamw"))
ADAFACTOR = make_optimizer(OptimConfig(name="adafactor"))
GEMMA2_2B = get_preset("gemma2_2b")  # float32 parameters and activations


def live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())


def test_gemma2_2b_sft_is_refused_in_seconds_without_allocating(caplog):
    # Given: the SFT run that was OOM-killed (AdamW, batch 8 x 128 tokens, float32, 1 device),
    # its shapes not yet traced by an earlier test.
    memory._policy_shapes.cache_clear()
    before, start = live_bytes(), time.perf_counter()
    # When: it is estimated against the whole host's RAM and checked.
    estimate = estimate_training_memory(GEMMA2_2B, ADAMW, batch_size=8, length=128)
    available = available_memory_bytes(devices_in_use=1)
    with pytest.raises(InsufficientMemoryError) as refused:
        check_fits(estimate, available, "sft gemma2_2b", force=False)
    elapsed = time.perf_counter() - start
    # Then: parameters + gradients + two moments alone are 4 x 10.5 GB, far past 24 GiB, and the
    # refusal came from shapes only.
    assert estimate.total > 24 * GIB
    assert elapsed < 10.0
    assert live_bytes() - before < 2**20
    message = str(refused.value)
    assert f"{estimate.total / GIB:.2f} GiB per device" in message
    assert f"{available[0] / GIB:.2f} GiB available" in message
    assert available[1] in message and "MemAvailable" in available[1]
    assert "optimizer state 19.48" in message  # the largest part, named
    assert "force_memory=true" in message
    # With force the same run only warns.
    with caplog.at_level(logging.WARNING):
        check_fits(estimate, available, "sft gemma2_2b", force=True)
    assert "running anyway" in caplog.text


def test_tiny_preset_fits_a_share_of_the_host():
    estimate = estimate_training_memory(get_preset("tiny_gemma2"), ADAMW, 8, 128)
    available, source = available_memory_bytes()
    assert "shared by 8 CPU devices" in source
    whole_host, _ = available_memory_bytes(devices_in_use=1)
    assert available == pytest.approx(whole_host / 8, rel=0.05)  # MemAvailable moves a little
    assert estimate.total < 64 * 2**20
    check_fits(estimate, (available, source), "sft tiny_gemma2", force=False)


def test_margin_is_ninety_percent_of_available():
    estimate = MemoryEstimate(
        parameters=900, gradients=0, optimizer=0, activations=0, logits=0, kv_cache=0
    )
    check_fits(estimate, (1000, "test"), "exactly at the margin", force=False)
    assert MEMORY_MARGIN == 0.9
    with pytest.raises(InsufficientMemoryError, match=r"more than 90% of the 0\.00 GiB"):
        check_fits(estimate, (999, "test"), "just past it", force=False)


def test_adamw_state_is_two_float32_copies_and_adafactor_far_less():
    param_bytes = tree_bytes(abstract_params(GEMMA2_2B))
    adamw = estimate_training_memory(GEMMA2_2B, ADAMW, 8, 128)
    adafactor = estimate_training_memory(GEMMA2_2B, ADAFACTOR, 8, 128)
    assert adamw.parameters == adamw.gradients == param_bytes
    # mu and nu, plus two int32 step counts (Adam's and the schedule's).
    assert adamw.optimizer == 2 * param_bytes + 2 * 4
    assert adafactor.optimizer < 0.01 * param_bytes


def test_fsdp_over_8_devices_divides_parameters_and_activations():
    single = estimate_training_memory(GEMMA2_2B, ADAMW, 8, 128)
    fsdp = estimate_training_memory(GEMMA2_2B, ADAMW, 8, 128, MeshConfig(fsdp=-1), num_devices=8)
    # Norm scales are replicated; every matrix splits its model width (2304 = 8 x 288) evenly.
    assert single.parameters / 8 <= fsdp.parameters <= single.parameters / 8 * 1.001
    assert single.optimizer / 8 <= fsdp.optimizer <= single.optimizer / 8 * 1.001
    assert fsdp.activations * 8 == single.activations  # one row per device instead of 8
    # A real mesh over the 8 simulated devices gives the same figures.
    on_mesh = estimate_training_memory(GEMMA2_2B, ADAMW, 8, 128, make_mesh(MeshConfig()))
    assert on_mesh == fsdp


def test_frozen_reference_adds_exactly_its_bytes():
    config = get_preset("tiny_gemma2")
    reference = abstract_params(config)
    alone = estimate_training_memory(config, ADAMW, 8, 64)
    with_reference = estimate_training_memory(config, ADAMW, 8, 64, frozen=[("ref", reference)])
    assert with_reference.total - alone.total == tree_bytes(reference)
    assert "frozen ref" in with_reference.table()
    # On a mesh the reference is sharded exactly like the policy it copies.
    sharded = estimate_training_memory(
        config, ADAMW, 8, 64, MeshConfig(), num_devices=8, frozen=[("ref", reference)]
    )
    assert sharded.frozen == (("ref", sharded.parameters),)


def test_remat_and_micro_batches_change_the_right_parts():
    base = estimate_training_memory(GEMMA2_2B, ADAMW, 8, 128)
    remat = estimate_training_memory(GEMMA2_2B.replace(remat=True), ADAMW, 8, 128)
    micro = estimate_training_memory(GEMMA2_2B, ADAMW, 8, 128, micro_batches=2)
    assert remat.activations < base.activations / 5
    assert micro.activations * 2 == base.activations
    assert micro.gradients == 2 * base.gradients  # + the float32 accumulator


def test_kv_cache_matches_init_cache_bytes():
    # 13 local layers keep 4096 slots, 13 global ones all 8192.
    cache = jax.eval_shape(lambda: init_cache(GEMMA2_2B, 2, 8192))
    assert kv_cache_bytes(GEMMA2_2B, 2, 8192) == tree_bytes(cache)
    estimate = estimate_training_memory(GEMMA2_2B, ADAMW, 8, 128, rollout_batch=2, cache_size=8192)
    assert estimate.kv_cache == tree_bytes(cache)
