"""The host allocator setting: XLA:CPU's per-call scratch buffer stops being page-faulted in."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
    reason="the setting only applies to glibc on Linux",
)

BUFFER_BYTES = 64 << 20  # above glibc's largest mmap threshold (32 MB)

# Calls a jitted function whose scratch buffer holds one 64 MB intermediate (a transposed
# copy) and reports the minor page faults per call after 20 warm-up calls (glibc's heap
# settles within a few).
_SCRIPT = f"""
import json, resource, sys
from posttrain.host_memory import configure_host_allocator
configured = configure_host_allocator() if sys.argv[1] == "reuse" else False
import jax, jax.numpy as jnp

SIDE = {int((BUFFER_BYTES // 4) ** 0.5)}

@jax.jit
def doubled_sum(x):
    return (jnp.exp(x).reshape(SIDE, SIDE).T.reshape(-1) * x).sum()

x = jnp.ones(SIDE * SIDE, jnp.float32)
scratch = doubled_sum.lower(x).compile().memory_analysis().temp_size_in_bytes
for _ in range(20):
    doubled_sum(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    doubled_sum(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
print(json.dumps(dict(configured=configured, scratch=scratch, faults=faults)))
"""


def faults_per_call(setting: str) -> dict:
    """Run the script in a fresh process, with the setting ('reuse') or without ('default')."""
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, setting],
        env=os.environ | {"XLA_FLAGS": ""},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_scratch_buffer_is_reused_across_calls():
    """With the setting, repeated calls fault in (almost) nothing; without it, the whole
    scratch buffer every call (which is what the setting is for)."""
    pages = BUFFER_BYTES / os.sysconf("SC_PAGE_SIZE")
    kept = faults_per_call("reuse")
    default = faults_per_call("default")
    assert kept["configured"] and not default["configured"]
    assert kept["scratch"] >= BUFFER_BYTES and default["scratch"] >= BUFFER_BYTES
    assert kept["faults"] < 0.05 * pages, kept
    assert default["faults"] > 0.5 * pages, default
