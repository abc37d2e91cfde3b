"""Pieces the benchmark scripts share: timing, results files, the Tunix Gemma of a config."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def median_seconds(run: Callable[[], object], iters: int, warmup: int = 1) -> float:
    """Median wall time of `run` after `warmup` untimed calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def host_busy_ticks() -> int:
    """Busy clock ticks of the whole host over all CPUs (user, nice, system, irq, softirq, steal)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7]


def own_ticks() -> int:
    """User + system clock ticks of this process, all threads."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def time_steps(step: Callable[[], object], iters: int, warmup: int = 2) -> dict[str, float]:
    """Median/min/max seconds of `step` after warm-up, and the CPU share others used meanwhile."""
    for _ in range(warmup):
        step()
    busy, own, began = host_busy_ticks(), own_ticks(), time.perf_counter()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    capacity = (time.perf_counter() - began) * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
    elsewhere = (host_busy_ticks() - busy) - (own_ticks() - own)
    return dict(
        seconds=statistics.median(times),
        fastest=min(times),
        slowest=max(times),
        busy_elsewhere=max(0.0, elsewhere / capacity),
    )


def reuse_host_memory() -> None:
    """Apply the host allocator setting of posttrain's training runs to this worker process, or
    fail: a side labelled with the setting must not silently run without it."""
    from posttrain.host_memory import configure_host_allocator

    if not configure_host_allocator():
        raise RuntimeError("the host allocator setting did not apply (glibc on Linux only)")


def package_versions(names: tuple[str, ...]) -> str:
    """`name version` of each installed package, comma-separated (a results file's header)."""
    import importlib.metadata as metadata

    return ", ".join(f"{name} {metadata.version(name)}" for name in names)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or the platform string)."""
    import platform

    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def prepend_results(path: Path, header: str, section: str) -> None:
    """Write `section` under `header` at the top of a results file, keeping earlier runs."""
    previous = path.read_text().removeprefix(header) if path.exists() else ""
    path.write_text(header + section + ("\n" + previous if previous else ""))


def tunix_gemma(config: Any) -> Any:
    """A randomly initialised Tunix Gemma 2 with the shape of a posttrain ModelConfig."""
    from flax import nnx
    from tunix.models.gemma import model as tunix_model

    types = tunix_model.AttentionType
    return tunix_model.Gemma(
        tunix_model.ModelConfig(
            num_layers=config.num_layers,
            num_embed=config.vocab_size,
            embed_dim=config.embed_dim,
            hidden_dim=config.hidden_dim,
            num_heads=config.num_heads,
            head_dim=config.head_dim,
            num_kv_heads=config.num_kv_heads,
            final_logit_softcap=config.final_logit_softcap,
            use_post_attn_norm=config.use_post_norms,
            use_post_ffw_norm=config.use_post_norms,
            attention_types=tuple(
                types.LOCAL_SLIDING if t == "local" else types.GLOBAL for t in config.layer_types
            ),
            attn_logits_soft_cap=config.attn_logit_softcap,
            sliding_window_size=config.sliding_window,
        ),
        rngs=nnx.Rngs(0),
    )
