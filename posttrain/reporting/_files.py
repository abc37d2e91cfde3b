"""What every run file shares: only process 0 writes, and a reader never sees half a file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def is_writer() -> bool:
    """Whether this process writes run files (process 0 of a multi-host job)."""
    import jax  # imported here so that the sweep table (no JAX at all) can use this package

    return jax.process_index() == 0


def write_atomically(path: Path, data: bytes | str) -> Path:
    """Write `path` through a temporary file in its folder and a rename, so a reader (or a
    killed run) sees the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(payload)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path
