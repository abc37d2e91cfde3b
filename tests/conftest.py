"""Test session setup: 8 simulated CPU devices, wandb off, float32 matmuls at full precision."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    """Slow end-to-end tests first (stable otherwise): under `--dist loadfile` the longest
    files (the flagship recipe takes minutes) start at once instead of last on one worker."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
