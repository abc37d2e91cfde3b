"""The persistent compilation cache the `posttrain` command turns on: where it goes, who wins."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]

# A fresh process: the suite's own cache (conftest) must not be touched by these settings.
_PROGRAM = textwrap.dedent(
    """
    import sys
    import jax
    import jax.numpy as jnp
    from posttrain.compilation_cache import configure_compilation_cache

    chosen = configure_compilation_cache(sys.argv[1] if sys.argv[1] != "none" else None)
    print("chosen", chosen)
    jax.jit(lambda x: jnp.sin(x) * 3.0 + x)(jnp.arange(7.0)).block_until_ready()
    """
)


def _run(argument: str, env_cache: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env = {k: v for k, v in env.items() if not k.startswith("JAX_PERSISTENT_CACHE")}
    if env_cache is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = env_cache
    result = subprocess.run(
        [sys.executable, "-c", _PROGRAM, argument],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _cached_lambdas(directory: Path) -> list[Path]:
    # The cache also keeps a .lockfile and per-entry -atime files: count the programs themselves.
    return list(directory.glob("jit__lambda-*-cache"))


def test_compiled_programs_land_in_the_configured_directory(tmp_path):
    directory = tmp_path / "xla"
    assert f"chosen {directory}" in _run(str(directory), env_cache=None)
    # Even a program that compiles in milliseconds is kept (JAX's default floor is 1 s).
    assert len(_cached_lambdas(directory)) == 1


def test_the_environment_variable_wins_and_none_turns_it_off(tmp_path):
    configured, from_env = tmp_path / "configured", tmp_path / "env"
    assert f"chosen {from_env}" in _run(str(configured), env_cache=str(from_env))
    assert not configured.exists() and len(_cached_lambdas(from_env)) == 1
    assert "chosen None" in _run("none", env_cache=None)


def test_the_default_directory_follows_xdg_cache_home(monkeypatch, tmp_path):
    config = OmegaConf.load(ROOT / "conf" / "config.yaml")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert config.compilation_cache == f"{tmp_path}/posttrain/xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", "/home/researcher")
    assert config.compilation_cache == "/home/researcher/.cache/posttrain/xla"
