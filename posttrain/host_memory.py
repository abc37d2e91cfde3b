"""Keep freed host memory in the process, so XLA:CPU's per-call scratch buffer is not re-faulted.

XLA:CPU allocates one scratch buffer per executable call (87 MB for a tiny reward step, 330 MB
at the 4-layer benchmark shape). glibc serves allocations that large with a fresh `mmap` and
returns them with `munmap`, so every call page-faults the whole buffer back in: 39 ms of kernel
time in a 54 ms tiny reward step, 146 of 303 ms at 4 layers (two cores). Allocations from XLA's
worker threads cannot be kept by raising glibc's mmap threshold (it is capped at 32 MB, and a
worker thread's arena falls back to `mmap` anyway), so this routes every thread to the main
heap, turns `mmap` off for malloc and keeps up to `TRIM_THRESHOLD_BYTES` of freed memory at the
top of the heap for reuse.

The `posttrain` command applies it to runs that train (`host_allocator=auto`; `reuse` or
`default` force it on or off); library users call `configure_host_allocator()` themselves.
The costs: freed buffers stay with the process (up to the trim threshold at the top of the
heap) and aligned allocations leave holes, so the heap grows now and then for up to ~100
calls and settles at about two scratch buffers more than before (reward step at the 4-layer
shape: 1.0 -> 1.7 GB peak RSS, flat after that); and with one malloc arena for all threads, compiling is ~20% slower and
dispatch-bound decoding ~14% slower. Only glibc on Linux is touched.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
TRIM_THRESHOLD_BYTES = 1 << 30

_configured: bool | None = None


def configure_host_allocator() -> bool:
    """Make glibc reuse freed large buffers (see the module docstring); True if it was set.

    Call before the first JAX computation: threads that already have their own malloc arena
    keep it. Idempotent.
    """
    global _configured
    if _configured is not None:
        return _configured
    _configured = False
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False  # musl and others: different allocator, nothing to tune here
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    _configured = all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
    return _configured
