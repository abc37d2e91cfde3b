"""Forward+backward training-step throughput: posttrain (JAX) vs transformers (PyTorch).

One step = next-token cross-entropy (float32, mean over tokens) and its gradient with respect
to every parameter, float32, B=8, T=128. Both sides get the same config and the same weights
(exported with `save_hf`), and the losses are checked to agree before timing. The machine's
float32 matmul peak is measured in the same job, and each model's matmul FLOP rate is reported
as a fraction of it.

Each side runs in its own child process of this job, one after the other: with JAX and PyTorch
in one process their thread pools fight over the two cores (measured here: transformers ran
the 4-layer step at 173 tok/s next to a JAX runtime and at 5277 tok/s alone).

    .venv/bin/python experiments/bench/backbone/bench_backbone.py [--iters 10]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

# Scripts run by path: make `experiments.bench.common` importable from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from experiments.bench.common import median_seconds, prepend_results
from posttrain.checkpoints import save_hf
from posttrain.models import ModelConfig, abstract_params, forward, get_preset, init_params

BATCH, LENGTH = 8, 128
SHAPES = ("bench_gemma2_4l", "bench_gemma2_30m")
RESULTS = Path(__file__).with_name("RESULTS.md")


def matmul_peak_gflops(iters: int) -> tuple[float, int]:
    """Best float32 GFLOP/s of a jitted square matmul, and the size that reached it."""
    best = (0.0, 0)
    for size in (512, 1024, 2048):
        a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
        product = jax.jit(jnp.dot)
        seconds = median_seconds(lambda a=a, b=b, f=product: f(a, b).block_until_ready(), iters)
        best = max(best, (2 * size**3 / seconds / 1e9, size))
    return best


def step_matmul_flops(config: ModelConfig, batch: int, length: int) -> int:
    """Matmul FLOPs of one forward+backward step (3x the forward), counted from the shapes.

    Attention scores and values are counted over the full T x T square, as both implementations
    compute them (the causal and window masks do not skip work).
    """
    d, n, k, h, f = (
        config.embed_dim,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.hidden_dim,
    )
    tokens = batch * length
    projections = 2 * tokens * d * h * (n + 2 * k + n)  # q, k, v, o
    attention = 2 * 2 * batch * n * length * length * h  # q.k and p.v
    mlp = 2 * tokens * d * f * 3  # gate, up, down
    logits = 2 * tokens * d * config.vocab_size
    forward_flops = config.num_layers * (projections + attention + mlp) + logits
    return 3 * forward_flops


def posttrain_step(config: ModelConfig, params, tokens: np.ndarray) -> tuple[Callable, float]:
    """A jitted loss-and-gradient step, and its loss."""

    def loss_fn(p, batch):
        logits = forward(config, p, batch[:, :-1])
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        chosen = jnp.take_along_axis(log_probs, batch[:, 1:, None], axis=-1)
        return -jnp.mean(chosen)

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    batch = jnp.asarray(tokens)
    loss, _ = grad_fn(params, batch)

    def step():
        jax.block_until_ready(grad_fn(params, batch))

    return step, float(loss)


def transformers_step(directory: Path, tokens: np.ndarray) -> tuple[Callable, float]:
    """The same step in transformers (eager attention, float32), and its loss."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    )
    model.train()
    batch = torch.as_tensor(tokens)

    def loss_value():
        logits = model(batch[:, :-1]).logits.float()
        log_probs = torch.log_softmax(logits, dim=-1)
        return -log_probs.gather(-1, batch[:, 1:, None]).mean()

    def step():
        model.zero_grad(set_to_none=True)
        loss_value().backward()

    with torch.no_grad():
        loss = float(loss_value())
    return step, loss


def worker(side: str, name: str, directory: Path, iters: int) -> dict:
    """Measure one side on one shape (runs in a child process); returns its numbers."""
    config = get_preset(name)
    tokens = np.random.default_rng(0).integers(3, config.vocab_size, (BATCH, LENGTH + 1))
    if side == "posttrain":
        params = init_params(config, jax.random.key(0))
        save_hf(config, params, directory)  # the weights the other side will load
        step, loss = posttrain_step(config, params, tokens)
    else:
        torch.set_num_threads(os.cpu_count() or 1)
        step, loss = transformers_step(directory, tokens)
    return dict(seconds=median_seconds(step, iters), loss=loss)


def run_worker(side: str, name: str, directory: Path, iters: int) -> dict:
    """Run `worker` in a fresh Python process of this job."""
    command = [sys.executable, __file__, "--worker", side, "--shapes", name]
    command += ["--iters", str(iters), "--directory", str(directory)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def run(shapes: list[str], iters: int) -> list[dict]:
    """Measure every shape, both sides; returns one row per shape."""
    rows = []
    for name in shapes:
        config = get_preset(name)
        with tempfile.TemporaryDirectory() as directory:
            ours = run_worker("posttrain", name, Path(directory), iters)
            theirs = run_worker("transformers", name, Path(directory), iters)
        if abs(ours["loss"] - theirs["loss"]) > 1e-4:
            raise SystemExit(f"{name}: losses differ ({ours} vs {theirs}): not the same model")
        flops = step_matmul_flops(config, BATCH, LENGTH)
        params_count = sum(x.size for x in jax.tree.leaves(abstract_params(config)))
        rows.append(
            dict(
                shape=name,
                params=params_count,
                ours_tps=BATCH * LENGTH / ours["seconds"],
                theirs_tps=BATCH * LENGTH / theirs["seconds"],
                ours_gflops=flops / ours["seconds"] / 1e9,
                theirs_gflops=flops / theirs["seconds"] / 1e9,
            )
        )
    return rows


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or the platform string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(rows: list[dict], peak: float, peak_size: int, iters: int) -> str:
    """The markdown results section."""
    lines = [
        f"## {datetime.date.today().isoformat()} — CPU, float32, B={BATCH}, T={LENGTH}",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, {platform.system()}",
        f"- versions: jax {jax.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        f"- measured float32 matmul peak (jitted `jnp.dot`, {peak_size}²): **{peak:.1f} GFLOP/s**",
        f"- median of {iters} steps after warm-up, each side in its own process of the job; "
        "FLOPs = matmuls of forward x 3 (full T x T attention)",
        "- command: `.venv/bin/python experiments/bench/backbone/bench_backbone.py`",
        "",
        "| shape | params | posttrain tok/s | transformers tok/s | ratio | posttrain GFLOP/s "
        "(% peak) | transformers GFLOP/s (% peak) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['params'] / 1e6:.1f}M | {r['ours_tps']:.0f} | {r['theirs_tps']:.0f} "
            f"| **{r['ours_tps'] / r['theirs_tps']:.2f}x** | {r['ours_gflops']:.1f} "
            f"({100 * r['ours_gflops'] / peak:.0f}%) | {r['theirs_gflops']:.1f} "
            f"({100 * r['theirs_gflops'] / peak:.0f}%) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the benchmark, print the table and prepend it to RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--worker", choices=["posttrain", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--directory", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.shapes[0], args.directory, args.iters)))
        return
    peak, peak_size = matmul_peak_gflops(args.iters)
    section = report(run(args.shapes, args.iters), peak, peak_size, args.iters)
    print(section)
    if not args.no_write:
        prepend_results(RESULTS, "# Backbone throughput: posttrain vs transformers\n\n", section)


if __name__ == "__main__":
    main()
