"""Test session setup: 8 simulated CPU devices, wandb off, float32 matmuls at full precision,
one persistent XLA compilation cache per session."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

# Every compiled program, however small, goes to the cache (most compile in well under the
# default 1 s). A size limit turns on the cache's file lock, so that xdist workers and CLI
# subprocesses can read and write it at once.
_COMPILATION_CACHE = {
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_compilation_cache_max_size": 8 << 30,
}


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """Share compiled programs across the session: the CLI runs that tests start (a resumed run
    compiles what the run it resumes compiled) and the xdist workers. The cache lives in the
    session's temporary directory, so every `make test` starts cold and pytest prunes old ones."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return  # chosen by the caller, or inherited by an xdist worker from the controller
    basetemp = config._tmp_path_factory.getbasetemp()
    # An xdist worker's basetemp is popen-gwN inside the session's, which all workers share.
    session = basetemp.parent if hasattr(config, "workerinput") else basetemp
    directory = session / "xla-compilation-cache"
    directory.mkdir(exist_ok=True)
    settings = {"jax_compilation_cache_dir": str(directory), **_COMPILATION_CACHE}
    for name, value in settings.items():
        jax.config.update(name, value)
        os.environ[name.upper()] = str(value)  # for the subprocesses tests start


def expected_minutes(item: pytest.Item) -> float:
    """A test's `slow(minutes=...)` estimate: 1 for a plain `slow` mark, 0 without one."""
    marker = item.get_closest_marker("slow")
    return 0.0 if marker is None else float(marker.kwargs.get("minutes", 1))


def pytest_collection_modifyitems(config, items):
    """Longest tests first (stable otherwise): under `--dist loadfile --no-loadscope-reorder`
    (the Makefile's) files go out in this order, so the flagship recipe starts at once."""
    items.sort(key=lambda item: -expected_minutes(item))
