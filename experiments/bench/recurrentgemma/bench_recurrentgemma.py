"""RecurrentGemma against Gemma 2 on the CPU: sampling throughput and decoding-state memory
against generated length, and the training step against transformers' RecurrentGemma.

Part 1 (the RecurrentGemma report's throughput figure, at a tiny size). posttrain's sampler
(`posttrain.sampling.generate`, through the backbone interface) generates 256 ... 8192 tokens
after 32-token prompts, at temperature 1 with no stop token so every row generates all of them,
for two models of about 4.2M parameters with the same depth (4), width (256), head size (64),
MLP width (1024) and vocabulary (1024): `bench_gemma2_4l` (local, global, local, global; local
window 64) and a RecurrentGemma with the same numbers (recurrent, recurrent, attention,
recurrent; window 64). Gemma's global layers keep every key, so its cache grows with the length;
RecurrentGemma's state (Conv1D taps, RG-LRU state, a 64-slot ring) does not. The state size is
the byte count of the decoding state's arrays; each worker also reports its process's peak RSS
(which includes the runtime and the compiler). The same bytes at the 2B sizes (bfloat16, one
row) are computed from abstract shapes, nothing allocated.

Part 2. Forward+backward tokens/s of our RecurrentGemma against transformers'
`RecurrentGemmaForCausalLM` on the same weights (exported with `save_hf` under transformers'
window semantics, which the export records), next-token cross-entropy, float32; the losses must
agree to 1e-4 before anything is timed. Skipped, saying so, without torch and transformers.

Each measurement runs in its own child process of this job, one after the other (JAX and
PyTorch thread pools fight over the cores when they share a process; see the backbone bench),
and reports the share of the CPU other processes used meanwhile: rows above 10% are marked.

    .venv/bin/python experiments/bench/recurrentgemma/bench_recurrentgemma.py          # full
    .venv/bin/python experiments/bench/recurrentgemma/bench_recurrentgemma.py --quick  # minutes
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

# Scripts run by path: make `experiments.bench.common` importable from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from experiments.bench.common import cpu_name, package_versions, prepend_results, time_steps

HERE = Path(__file__).parent
RESULTS = HERE / "RESULTS.md"
PLOT = HERE / "sampling_vs_length.png"
HEADER = "# RecurrentGemma vs Gemma 2: sampling against length, training step vs transformers\n\n"
COMMAND = ".venv/bin/python experiments/bench/recurrentgemma/bench_recurrentgemma.py"
PROMPT_LENGTH = 32
FULL_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
QUICK_LENGTHS = (256, 512)
MODELS = ("gemma2", "recurrentgemma")
LOSS_TOLERANCE = 1e-4
BUSY_ELSEWHERE = 0.10  # CPU share used by other processes above which a row is marked
REAL_SIZES = ("gemma_2b", "gemma2_2b", "recurrentgemma_2b")


def bench_config(model: str) -> Any:
    """The ~4.2M-parameter config of each side (see the module docstring)."""
    from posttrain.models import RecurrentGemmaConfig, get_preset

    if model == "gemma2":
        return get_preset("bench_gemma2_4l")
    return RecurrentGemmaConfig(
        num_layers=4,
        width=256,
        num_heads=4,
        lru_width=256,
        mlp_width=1024,
        vocab_size=1024,
        attention_window=64,
    )


def state_bytes(config: Any, batch: int, max_length: int, dtype: str | None = None) -> int:
    """Bytes of the arrays of the decoding state of `batch` rows of up to `max_length` tokens."""
    import jax

    from posttrain.models.backbone import abstract_state

    state = abstract_state(config, batch, max_length, dtype)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state))


def param_count(config: Any) -> int:
    """Parameters, from abstract shapes."""
    import jax

    from posttrain.models import abstract_params

    return sum(leaf.size for leaf in jax.tree.leaves(abstract_params(config)))


def prompts(batch: int, length: int, vocab: int) -> np.ndarray:
    """Random token ids [batch, length], avoiding the special ids 0-2."""
    return np.random.default_rng(0).integers(3, vocab, (batch, length)).astype(np.int32)


# Workers: each runs in a child process and prints one JSON line.


def sample_worker(model: str, batch: int, new_tokens: int, iters: int) -> dict[str, Any]:
    """Seconds per `generate` call of `new_tokens` tokens, state bytes and peak RSS."""
    import jax
    import jax.numpy as jnp

    from posttrain.models import init_params
    from posttrain.sampling import generate

    config = bench_config(model)
    params = init_params(config, jax.random.key(0))
    tokens = jnp.asarray(prompts(batch, PROMPT_LENGTH, config.vocab_size))
    segments = jnp.ones_like(tokens)

    def run() -> None:
        out = generate(
            config,
            params,
            tokens,
            segments,
            jax.random.key(0),
            jnp.float32(1.0),
            jnp.int32(0),
            jnp.float32(1.0),
            max_new_tokens=new_tokens,
            stop_ids=(),
        )
        jax.block_until_ready(out)
        assert int(out.lengths.min()) == new_tokens

    timing = time_steps(run, iters, warmup=1)  # the warm-up call compiles
    return dict(
        **timing,
        state_bytes=state_bytes(config, batch, PROMPT_LENGTH + new_tokens),
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
    )


def train_worker(side: str, directory: Path, batch: int, length: int, iters: int) -> dict:
    """Loss and seconds per forward+backward step of one side on the exported weights."""
    tokens = prompts(batch, length + 1, bench_config("recurrentgemma").vocab_size)
    if side == "posttrain":
        import jax
        import jax.numpy as jnp

        from posttrain.checkpoints import load_hf
        from posttrain.models import forward

        config, params = load_hf(directory)
        assert config.window_semantics == "hf"  # read back from the export's config.json

        def loss_fn(p: Any, rows: jax.Array) -> jax.Array:
            log_probs = jax.nn.log_softmax(forward(config, p, rows[:, :-1]), axis=-1)
            return -jnp.mean(jnp.take_along_axis(log_probs, rows[:, 1:, None], axis=-1))

        grad_fn = jax.jit(jax.value_and_grad(loss_fn))
        rows = jnp.asarray(tokens)
        loss = float(grad_fn(params, rows)[0])
        return dict(
            loss=loss, **time_steps(lambda: jax.block_until_ready(grad_fn(params, rows)), iters)
        )

    import torch
    import transformers

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = transformers.RecurrentGemmaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.train()
    rows = torch.as_tensor(tokens, dtype=torch.long)

    def loss_value() -> torch.Tensor:
        log_probs = torch.log_softmax(model(rows[:, :-1]).logits.float(), dim=-1)
        return -log_probs.gather(-1, rows[:, 1:, None]).mean()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss_value().backward()

    with torch.no_grad():
        loss = float(loss_value())
    return dict(loss=loss, **time_steps(step, iters))


def run_worker(*args: str) -> dict[str, Any]:
    """Run this script as a worker in a fresh process; its last stdout line is the result."""
    command = [sys.executable, __file__, "--worker", *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"worker {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# The job.


def sampling_rows(lengths: tuple[int, ...], batch: int, iters: int) -> list[dict[str, Any]]:
    """Both models at every generated length, one process each."""
    rows = []
    for new_tokens in lengths:
        row: dict[str, Any] = {"new_tokens": new_tokens}
        for model in MODELS:
            row[model] = run_worker("sample", model, str(batch), str(new_tokens), str(iters))
            print(f"sampled {model} N={new_tokens}: {row[model]}", file=sys.stderr)
        rows.append(row)
    return rows


def real_size_rows(lengths: tuple[int, ...]) -> list[dict[str, Any]]:
    """Decoding-state bytes of the 2B presets (bfloat16, one row), from abstract shapes."""
    from posttrain.models.backbone import get_preset

    return [
        {
            "new_tokens": n,
            **{
                name: state_bytes(get_preset(name), 1, PROMPT_LENGTH + n, "bfloat16")
                for name in REAL_SIZES
            },
        }
        for n in lengths
    ]


def training_result(batch: int, length: int, iters: int) -> dict[str, Any] | str:
    """Both sides' training step on the same weights, or why it was not run."""
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        return f"not run: {' and '.join(missing)} not installed (`pip install -e '.[test]'`)"
    import jax

    from posttrain.checkpoints import save_hf
    from posttrain.models import init_params

    config = bench_config("recurrentgemma").replace(window_semantics="hf")
    with tempfile.TemporaryDirectory() as directory:
        save_hf(config, init_params(config, jax.random.key(0)), directory)
        args = (directory, str(batch), str(length), str(iters))
        ours = run_worker("train", "posttrain", *args)
        theirs = run_worker("train", "transformers", *args)
    if abs(ours["loss"] - theirs["loss"]) > LOSS_TOLERANCE:
        raise SystemExit(f"losses differ: posttrain {ours['loss']}, transformers {theirs['loss']}")
    return dict(ours=ours, theirs=theirs)


# Report.


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}" if n < 2**20 * 10 else f"{n / 2**20:.0f}"


def _mark(result: dict[str, Any]) -> str:
    return " †" if result["busy_elsewhere"] > BUSY_ELSEWHERE else ""


def plot(rows: list[dict], real: list[dict], batch: int, quick: bool, path: Path) -> None:
    """Two panels: tokens/s and decoding-state bytes against generated length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [r["new_tokens"] for r in rows]
    millions = {m: param_count(bench_config(m)) / 1e6 for m in MODELS}
    labels = {
        "gemma2": f"Gemma 2 ({millions['gemma2']:.1f}M)",
        "recurrentgemma": f"RecurrentGemma ({millions['recurrentgemma']:.1f}M)",
    }
    colors = {"gemma2": "tab:blue", "recurrentgemma": "tab:orange"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for model in MODELS:
        rate = [batch * r["new_tokens"] / r[model]["seconds"] for r in rows]
        left.plot(lengths, rate, "o-", color=colors[model], label=labels[model])
        mib = [r[model]["state_bytes"] / 2**20 for r in rows]
        right.plot(lengths, mib, "o-", color=colors[model], label=f"{labels[model]}, B={batch}")
    styles = {"gemma_2b": ":", "gemma2_2b": "--", "recurrentgemma_2b": "-."}
    for name in REAL_SIZES:
        right.plot(
            [r["new_tokens"] for r in real],
            [r[name] / 2**20 for r in real],
            styles[name],
            color="tab:orange" if name.startswith("recurrent") else "tab:blue",
            alpha=0.6,
            label=f"{name}, B=1, bf16 (computed)",
        )
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("generated tokens (after a 32-token prompt)")
        axis.grid(True, which="both", alpha=0.3)
    left.set_ylabel(f"sampling tokens/s (B={batch}, float32)")
    left.set_ylim(bottom=0)
    right.set_yscale("log")
    right.set_ylabel("decoding state / KV cache (MiB)")
    left.legend()
    right.legend(fontsize=7)
    title = "CPU, posttrain sampler" + (" — QUICK RUN (short lengths, few calls)" if quick else "")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(
    args: argparse.Namespace,
    rows: list[dict],
    real: list[dict],
    training: dict[str, Any] | str,
    lengths: tuple[int, ...],
) -> str:
    """The markdown results section."""
    gemma, griffin = bench_config("gemma2"), bench_config("recurrentgemma")
    names = ["jax", "jaxlib", "flax", "torch", "transformers"]
    installed = tuple(n for n in names if importlib.util.find_spec(n) is not None)
    kind = (
        "QUICK RUN (`--quick`: short lengths, few calls; not the full benchmark)"
        if args.quick
        else "full run"
    )
    command = COMMAND + (" --quick" if args.quick else "")
    lines = [
        f"## {datetime.date.today().isoformat()} — CPU, float32 — {kind}",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, {platform.system()} "
        f"{platform.release()}",
        f"- versions: {package_versions(installed)}",
        f"- Gemma 2: `bench_gemma2_4l`, {param_count(gemma) / 1e6:.2f}M parameters "
        "(4 layers local/global, d 256, 4 heads x 64, 2 KV heads, MLP 1024, vocab 1024, window 64)",
        f"- RecurrentGemma: {param_count(griffin) / 1e6:.2f}M parameters (4 layers recurrent, "
        "recurrent, attention, recurrent; d 256 = lru width, 4 heads x 64, 1 KV head, MLP 1024, "
        "vocab 1024, window 64, official window semantics)",
        f"- sampling: B={args.batch}, 32-token prompts, temperature 1, no stop token; median of "
        f"{args.iters} `generate` calls after a compiling warm-up call, one process per cell; "
        "tok/s = B x generated tokens / call; state = bytes of the decoding state's arrays; "
        "RSS = the worker process's peak resident set (runtime and compiler included)",
        f"- † = other processes used more than {BUSY_ELSEWHERE:.0%} of the CPU meanwhile "
        "(this machine is shared)",
        f"- command: `{command}`",
        "",
        "| generated tokens | Gemma 2 tok/s | RecurrentGemma tok/s | RG / Gemma tok/s "
        "| Gemma 2 cache MiB | RecurrentGemma state MiB | Gemma / RG state "
        "| Gemma 2 peak RSS MiB | RG peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g, rg = r["gemma2"], r["recurrentgemma"]
        tps = {m: args.batch * r["new_tokens"] / r[m]["seconds"] for m in MODELS}
        lines.append(
            f"| {r['new_tokens']} | {tps['gemma2']:.0f}{_mark(g)} | "
            f"{tps['recurrentgemma']:.0f}{_mark(rg)} | "
            f"**{tps['recurrentgemma'] / tps['gemma2']:.2f}x** | {_mib(g['state_bytes'])} | "
            f"{_mib(rg['state_bytes'])} | {g['state_bytes'] / rg['state_bytes']:.0f}x | "
            f"{g['peak_rss'] / 2**20:.0f} | {rg['peak_rss'] / 2**20:.0f} |"
        )
    lines += [
        "",
        f"![tokens/s and state bytes against generated length]({PLOT.name})",
        "",
        "Decoding state at the 2B sizes, one row, bfloat16, computed from abstract shapes "
        "(`abstract_state`, nothing allocated), MiB:",
        "",
        "| generated tokens | " + " | ".join(f"`{n}`" for n in REAL_SIZES) + " |",
        "|---|" + "---|" * len(REAL_SIZES),
    ]
    for r in real:
        lines.append(f"| {r['new_tokens']} | " + " | ".join(_mib(r[n]) for n in REAL_SIZES) + " |")
    lines += [
        "",
        f"Training step, RecurrentGemma above, B={args.train_batch}, "
        f"T={args.train_length}, transformers' window semantics:",
        "",
    ]
    if isinstance(training, str):
        lines.append(f"- {training}")
    else:
        ours, theirs = training["ours"], training["theirs"]
        tokens = args.train_batch * args.train_length
        lines += [
            f"- next-token cross-entropy and its gradient on every parameter, float32; median of "
            f"{args.train_iters} steps after 2 warm-up steps, each side in its own process; "
            "transformers in train mode, `torch.set_num_threads(cores)`; losses agree to "
            f"{LOSS_TOLERANCE:g} before timing",
            "",
            "| posttrain tok/s | transformers tok/s | posttrain / transformers | loss (abs. difference) |",
            "|---|---|---|---|",
            f"| {tokens / ours['seconds']:.0f}{_mark(ours)} | "
            f"{tokens / theirs['seconds']:.0f}{_mark(theirs)} | "
            f"**{theirs['seconds'] / ours['seconds']:.2f}x** | "
            f"{ours['loss']:.5f} ({abs(ours['loss'] - theirs['loss']):.0e}) |",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the job (or, with --worker, one measurement) and write the results and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="lengths 256 and 512, few calls")
    parser.add_argument("--lengths", type=int, nargs="+", help="generated lengths to run")
    parser.add_argument("--batch", type=int, default=4, help="sampled rows")
    parser.add_argument("--iters", type=int, help="timed calls per cell (default 3, quick 1)")
    parser.add_argument("--train-iters", type=int, help="timed steps (default 10, quick 1)")
    parser.add_argument("--train-batch", type=int, help="training rows (default 8, quick 2)")
    parser.add_argument("--train-length", type=int, help="training tokens per row (default 128)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "sample":
            model, batch, new_tokens, iters = rest
            result = sample_worker(model, int(batch), int(new_tokens), int(iters))
        else:
            side, directory, batch, length, iters = rest
            result = train_worker(side, Path(directory), int(batch), int(length), int(iters))
        print(json.dumps(result))
        return

    lengths = tuple(args.lengths or (QUICK_LENGTHS if args.quick else FULL_LENGTHS))
    args.iters = args.iters or (1 if args.quick else 3)
    args.train_iters = args.train_iters or (1 if args.quick else 10)
    args.train_batch = args.train_batch or (2 if args.quick else 8)
    args.train_length = args.train_length or 128  # past the window: its semantics matter
    rows = sampling_rows(lengths, args.batch, args.iters)
    real = real_size_rows(FULL_LENGTHS)
    training = training_result(args.train_batch, args.train_length, args.train_iters)
    section = report(args, rows, real, training, lengths)
    print(section)
    if not args.no_write:
        plot(rows, real, args.batch, args.quick, PLOT)
        prepend_results(RESULTS, HEADER, section)


if __name__ == "__main__":
    main()
