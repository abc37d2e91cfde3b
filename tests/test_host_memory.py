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
# copy) and reports the minor page faults per call in 4 windows of 10 calls, after 40 warm-up
# calls. With the setting glibc's heap still grows now and then for up to ~100 calls (aligned
# allocations leave holes; 0-3 growths of one buffer each, then flat), so a window may fault.
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
for _ in range(40):
    doubled_sum(x).block_until_ready()
windows = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        doubled_sum(x).block_until_ready()
    windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
print(json.dumps(dict(configured=configured, scratch=scratch, windows=windows)))
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
    """With the setting, calls stop faulting the buffer in (some window of 10 calls is almost
    fault-free, and over 40 calls faults stay a fraction of the buffer); without it, every call
    faults the whole scratch buffer in (which is what the setting is for)."""
    pages = BUFFER_BYTES / os.sysconf("SC_PAGE_SIZE")
    kept = faults_per_call("reuse")
    default = faults_per_call("default")
    assert kept["configured"] and not default["configured"]
    assert kept["scratch"] >= BUFFER_BYTES and default["scratch"] >= BUFFER_BYTES
    assert min(kept["windows"]) < 0.05 * pages, kept
    assert sum(kept["windows"]) / 4 < 0.25 * pages, kept
    assert min(default["windows"]) > 0.5 * pages, default
