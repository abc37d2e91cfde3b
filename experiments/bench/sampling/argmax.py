"""The sampler's argmax: `jnp.argmax` vs `first_argmax` (max, then the first index reaching it).

Both run jitted on the same float32 logits in this process, alternating, for the shapes of a
decode step of the sampling benchmark (B rows x the 4-layer shape's 1024-token vocabulary).

    .venv/bin/python experiments/bench/sampling/argmax.py
"""

from __future__ import annotations

import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from experiments.bench.common import prepend_results
from posttrain.sampling.processors import first_argmax

VOCAB, CALLS, ROUNDS = 1024, 2000, 5
RESULTS = Path(__file__).with_name("RESULTS.md")


def microseconds(fn, x: jax.Array) -> float:
    """Mean microseconds per call over CALLS calls."""
    fn(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(CALLS):
        out = fn(x)
    out.block_until_ready()
    return (time.perf_counter() - start) / CALLS * 1e6


def main() -> None:
    """Measure both at B = 8 and 64 and prepend the table to RESULTS.md."""
    lines = [
        f"## {datetime.date.today()} — argmax in the decode loop, CPU ({os.cpu_count()} cores)",
        "",
        f"- median of {ROUNDS} alternating rounds of {CALLS} jitted calls, float32 [B, {VOCAB}]",
        "- command: `.venv/bin/python experiments/bench/sampling/argmax.py`",
        "",
        "| B | `jnp.argmax` µs | `first_argmax` µs | speed-up |",
        "|---|---|---|---|",
    ]
    argmax = jax.jit(lambda x: jnp.argmax(x, axis=-1))
    first = jax.jit(first_argmax)
    for batch in (8, 64):
        x = jax.random.normal(jax.random.key(0), (batch, VOCAB))
        assert (np.asarray(argmax(x)) == np.asarray(first(x))).all()
        rounds = [(microseconds(argmax, x), microseconds(first, x)) for _ in range(ROUNDS)]
        a, f = (statistics.median(r[i] for r in rounds) for i in (0, 1))
        lines.append(f"| {batch} | {a:.0f} | {f:.0f} | {a / f:.1f}x |")
    section = "\n".join(lines) + "\n"
    print(section)
    prepend_results(
        RESULTS, "# Sampling throughput: posttrain vs Tunix vs transformers\n\n", section
    )


if __name__ == "__main__":
    main()
