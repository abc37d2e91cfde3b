"""Forward+backward training-step throughput: posttrain (JAX) vs transformers (PyTorch).

One step = next-token cross-entropy (float32 from the logits, mean over tokens) and its gradient
with respect to every parameter, float32, B=8, T=128. Both sides get the same config and the
same weights (exported with `save_hf`), and their losses must agree to 1e-4 before anything is
timed. The float32 matmul peak of the machine is measured in the same job, each model's matmul
FLOP rate is reported as a fraction of it, and posttrain alone is then timed under CPU knobs
(XLA flags, matmul precision, the 8-simulated-devices flag, one core) at the ≈30M shape.

Every measurement runs in its own child process of this job, one after the other: a knob's
XLA_FLAGS only take effect in a fresh process, and in one process PyTorch's OpenMP workers
slowed the next JAX steps (4-layer shape: 0.16 s before any torch step, 0.25-0.39 s right after).
The host may be shared, so each worker also reports the share of the CPU that other processes
used while it timed; rows above 10% are marked and should be rerun.

    .venv/bin/python experiments/bench/backbone/bench_backbone.py [--shapes ...] [--iters 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

# Scripts run by path: make `experiments.bench.common` importable from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from experiments.bench.common import prepend_results, time_steps
from posttrain.checkpoints import save_hf
from posttrain.models import ModelConfig, abstract_params, forward, get_preset, init_params

BATCH, LENGTH = 8, 128
SHAPES = ("bench_gemma2_4l", "bench_gemma2_30m")
KNOB_SHAPE = "bench_gemma2_30m"  # the shape the targets are stated at
PEAK_SIZES = (1024, 2048, 3072, 4096)
LOSS_TOLERANCE = 1e-4
BUSY_ELSEWHERE = 0.10  # CPU share used by other processes above which a row is marked
COMMAND = ".venv/bin/python experiments/bench/backbone/bench_backbone.py"
RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Backbone throughput: posttrain vs transformers\n\n"


@dataclasses.dataclass(frozen=True)
class Knob:
    """One way of running the posttrain step: extra XLA flag, matmul precision, CPU set."""

    label: str
    xla_flag: str | None = None
    precision: str | None = None  # jax_default_matmul_precision
    one_core: bool = False


KNOBS = (
    # XLA's own dots are multithreaded through Eigen; the default YNNPACK dots use their own pool.
    Knob("`--xla_cpu_multi_thread_eigen=false`", xla_flag="--xla_cpu_multi_thread_eigen=false"),
    # An empty list turns the YNNPACK dot fusions off: dots go back to XLA's Eigen path.
    Knob(
        "`--xla_cpu_experimental_ynn_fusion_type=` (no YNNPACK)",
        xla_flag="--xla_cpu_experimental_ynn_fusion_type=",
    ),
    Knob("`--xla_cpu_use_onednn=true`", xla_flag="--xla_cpu_use_onednn=true"),
    Knob(
        "`--xla_cpu_enable_concurrency_optimized_scheduler=true`",
        xla_flag="--xla_cpu_enable_concurrency_optimized_scheduler=true",
    ),
    Knob("`--xla_cpu_prefer_vector_width=512`", xla_flag="--xla_cpu_prefer_vector_width=512"),
    # The tests' 8 simulated devices; the step itself still runs on device 0.
    Knob(
        "`--xla_force_host_platform_device_count=8`",
        xla_flag="--xla_force_host_platform_device_count=8",
    ),
    Knob("`jax_default_matmul_precision=bfloat16`", precision="bfloat16"),
    Knob("one core (CPU affinity {0})", one_core=True),
)


def matmul_peak(iters: int) -> tuple[float, int]:
    """Best median float32 GFLOP/s of a jitted square `jnp.dot`, and the size that reached it."""
    best = (0.0, 0)
    product = jax.jit(jnp.dot)
    for size in PEAK_SIZES:
        a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
        timing = time_steps(lambda a=a, b=b: product(a, b).block_until_ready(), iters)
        best = max(best, (2 * size**3 / timing["seconds"] / 1e9, size))
    return best


# FLOPs, counted from the shapes.


def forward_matmul_flops(config: ModelConfig, batch: int, length: int) -> dict[str, int]:
    """Matmul FLOPs of one forward pass by kind (2 per multiply-add).

    Attention products are counted over the full T x T square because both implementations
    compute it; `attention_masked` is the part of that square the causal and window masks zero.
    """
    d, n, k, h = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim
    f = config.hidden_dim
    tokens = batch * length
    query, key = np.arange(length)[:, None], np.arange(length)[None, :]
    masked = 0
    for kind in config.layer_types:
        visible = key <= query
        if kind == "local":
            visible &= query - key < config.sliding_window
        masked += int((~visible).sum())
    return dict(
        projections=config.num_layers * 2 * tokens * d * h * (n + k + k + n),  # q, k, v, o
        attention=config.num_layers * 2 * (2 * batch * n * length * length * h),  # q.k, p.v
        attention_masked=2 * (2 * batch * n * h) * masked,
        mlp=config.num_layers * 3 * (2 * tokens * d * f),  # gate, up, down
        logits=2 * tokens * d * config.vocab_size,  # tied unembedding
    )


def step_flops(config: ModelConfig, batch: int, length: int) -> int:
    """Matmul FLOPs of forward+backward: 3x the forward (the backward takes two products per one)."""
    counts = forward_matmul_flops(config, batch, length)
    return 3 * (counts["projections"] + counts["attention"] + counts["mlp"] + counts["logits"])


# The two steps.


def posttrain_step(config: ModelConfig, params: Any, tokens: np.ndarray) -> tuple[Callable, float]:
    """A jitted loss-and-gradient step on all parameters, and its loss."""

    def loss_fn(p: Any, batch: jax.Array) -> jax.Array:
        logits = forward(config, p, batch[:, :-1])  # float32 [b, t, v]
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(log_probs, batch[:, 1:, None], axis=-1))

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    batch = jnp.asarray(tokens)
    loss, _ = grad_fn(params, batch)
    return lambda: jax.block_until_ready(grad_fn(params, batch)), float(loss)


def transformers_step(directory: Path, tokens: np.ndarray) -> tuple[Callable, float]:
    """The same step in transformers (eager attention, float32, `loss.backward()`), and its loss."""
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    )
    model.train()
    batch = torch.as_tensor(tokens)

    def loss_value() -> torch.Tensor:
        log_probs = torch.log_softmax(model(batch[:, :-1]).logits.float(), dim=-1)
        return -log_probs.gather(-1, batch[:, 1:, None]).mean()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss_value().backward()

    with torch.no_grad():
        loss = float(loss_value())
    return step, loss


def worker(side: str, name: str, directory: Path, iters: int, precision: str | None) -> dict:
    """Measure one side on one shape (runs in a child process); returns its numbers."""
    config = get_preset(name)
    tokens = np.random.default_rng(0).integers(3, config.vocab_size, (BATCH, LENGTH + 1))
    if side == "posttrain":
        if precision:
            jax.config.update("jax_default_matmul_precision", precision)
        params = init_params(config, jax.random.key(0))
        save_hf(config, params, directory)  # the weights the transformers side loads
        step, loss = posttrain_step(config, params, tokens)
    else:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        step, loss = transformers_step(directory, tokens)
    return dict(loss=loss, **time_steps(step, iters))


def run_worker(side: str, name: str, directory: Path, iters: int, knob: Knob | None = None) -> dict:
    """Run `worker` in a fresh Python process of this job, under `knob` if given."""
    command = [sys.executable, __file__, "--worker", side, "--shapes", name]
    command += ["--iters", str(iters), "--directory", str(directory)]
    env = dict(os.environ)
    if knob and knob.precision:
        command += ["--precision", knob.precision]
    if knob and knob.xla_flag:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {knob.xla_flag}".strip()
    if knob and knob.one_core:
        command.append("--one-core")
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"{side} worker failed on {name}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(shapes: list[str], iters: int, knobs: bool) -> tuple[list[dict], list[dict]]:
    """Both sides on every shape, then the posttrain knobs; returns (comparison, knob) rows."""
    rows, knob_rows = [], []
    for name in shapes:
        config = get_preset(name)
        flops = step_flops(config, BATCH, LENGTH)
        with tempfile.TemporaryDirectory() as directory:
            ours = run_worker("posttrain", name, Path(directory), iters)
            theirs = run_worker("transformers", name, Path(directory), iters)
            if abs(ours["loss"] - theirs["loss"]) > LOSS_TOLERANCE:
                raise SystemExit(f"{name}: losses differ ({ours['loss']} vs {theirs['loss']})")
            params = sum(x.size for x in jax.tree.leaves(abstract_params(config)))
            rows.append(dict(shape=name, params=params, flops=flops, ours=ours, theirs=theirs))
            if knobs and name == KNOB_SHAPE:
                knob_rows.append(dict(label="default", flops=flops, result=ours, base=ours))
                for knob in KNOBS:
                    result = run_worker("posttrain", name, Path(directory), iters, knob)
                    knob_rows.append(dict(label=knob.label, flops=flops, result=result, base=ours))
                # The default once more: its drift is the noise floor the knobs are read against.
                again = run_worker("posttrain", name, Path(directory), iters)
                knob_rows.append(dict(label="default, again", flops=flops, result=again, base=ours))
    return rows, knob_rows


# Report.


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or the platform string)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _rate(result: dict, flops: int, peak: float) -> str:
    """Tokens/s with its spread, and GFLOP/s with the fraction of the peak."""
    mark = " †" if result["busy_elsewhere"] > BUSY_ELSEWHERE else ""
    tps = BATCH * LENGTH / result["seconds"]
    spread = f"{BATCH * LENGTH / result['slowest']:.0f}-{BATCH * LENGTH / result['fastest']:.0f}"
    gflops = flops / result["seconds"] / 1e9
    return f"{tps:.0f} ({spread}){mark} | {gflops:.0f} ({100 * gflops / peak:.0f}%)"


def report(rows: list[dict], knob_rows: list[dict], peak: float, peak_size: int, iters: int) -> str:
    """The markdown results section."""
    lines = [
        f"## {datetime.date.today().isoformat()} — CPU, float32, B={BATCH}, T={LENGTH}",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores "
        f"(`/proc/cpuinfo`), {platform.system()} {platform.release()}",
        f"- versions: jax {jax.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        f"- float32 matmul peak, best median of a jitted `jnp.dot` over sizes "
        f"{', '.join(map(str, PEAK_SIZES))}: **{peak:.0f} GFLOP/s** ({peak_size}²)",
        f"- median of {iters} steps after 2 warm-up steps, each measurement in its own process "
        f"of the job; tok/s = {BATCH * LENGTH} tokens / median step (min-max over the steps); "
        f"transformers with eager attention and `torch.set_num_threads({os.cpu_count()})`",
        "- FLOPs per step = 3 x forward matmul FLOPs (backward = 2 x forward), counted from the "
        "shapes with N = B*T tokens, per layer: q/k/v/o projections 2*N*d*h*(2n + 2k), "
        "QK^T and PV 2 * 2*B*n*T^2*h over the full T x T square, MLP 3 * 2*N*d*f; plus the tied "
        "logits 2*N*d*V once. Norms, RoPE, softmax, GELU and the loss are not counted.",
        f"- losses agree to {LOSS_TOLERANCE:g} before timing; † = other processes used more "
        f"than {BUSY_ELSEWHERE:.0%} of the CPU meanwhile",
        f"- command: `{COMMAND}`",
        "",
        "| shape | params | GFLOP/step (masked) | posttrain tok/s | posttrain GFLOP/s (% peak) "
        "| transformers tok/s | transformers GFLOP/s (% peak) | posttrain / transformers "
        "| loss (abs. difference) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        counts = forward_matmul_flops(get_preset(r["shape"]), BATCH, LENGTH)
        masked = 3 * counts["attention_masked"] / r["flops"]
        ratio = r["theirs"]["seconds"] / r["ours"]["seconds"]
        lines.append(
            f"| {r['shape']} | {r['params'] / 1e6:.1f}M | {r['flops'] / 1e9:.1f} ({masked:.1%}) "
            f"| {_rate(r['ours'], r['flops'], peak)} | {_rate(r['theirs'], r['flops'], peak)} "
            f"| **{ratio:.2f}x** "
            f"| {r['ours']['loss']:.5f} ({abs(r['ours']['loss'] - r['theirs']['loss']):.0e}) |"
        )
    if knob_rows:
        lines += [
            "",
            f"posttrain alone under CPU knobs, {KNOB_SHAPE} (one process per row, same job):",
            "",
            "| knob | tok/s | GFLOP/s (% peak) | vs default | loss - default loss |",
            "|---|---|---|---|---|",
        ]
        for r in knob_rows:
            result, base = r["result"], r["base"]
            lines.append(
                f"| {r['label']} | {_rate(result, r['flops'], peak)} "
                f"| {base['seconds'] / result['seconds']:.2f}x "
                f"| {result['loss'] - base['loss']:+.1e} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the benchmark, print the tables and prepend them to RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=sorted(SHAPES))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-knobs", action="store_true", help="skip the posttrain knob rows")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--worker", choices=["posttrain", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--directory", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--one-core", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_core:
        # Before the first JAX computation: XLA sizes its thread pools from the affinity mask.
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    if args.worker:
        result = worker(args.worker, args.shapes[0], args.directory, args.iters, args.precision)
        print(json.dumps(result))
        return
    peak, peak_size = matmul_peak(args.iters)
    rows, knob_rows = run(args.shapes, args.iters, knobs=not args.no_knobs)
    section = report(rows, knob_rows, peak, peak_size, args.iters)
    print(section)
    if not args.no_write:
        prepend_results(RESULTS, HEADER, section)


if __name__ == "__main__":
    main()
