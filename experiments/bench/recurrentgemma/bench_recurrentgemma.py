"""RecurrentGemma against Gemma 2: sampling throughput and decoding-state memory against
generated length (tiny models on the CPU; the 2B presets on a GPU), and the training step
against transformers' RecurrentGemma.

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

Part 3 (`--device-2b`, issue 16: 2B decode tokens/s against length; needs an accelerator).
`recurrentgemma_2b` and `gemma2_2b`, random init (jitted, so it runs on the device), bfloat16
parameters and activations, the same sampler call as Part 1 for batches 1 and 8 and 256 ... 8192
generated tokens. Each (model, length) runs in its own child process, which compiles the call
ahead of time (`generate.lower(...).compile()`, timed apart), makes a first call and, when that
took under `--min-time` seconds, up to `--iters` more, and reports decode tokens/s, the
decoding state's bytes and the device allocator's peak. Without an accelerator it refuses;
`--smoke` runs the same code with the tiny presets on whatever device there is (the CPU here).
Cells run endpoints first (shortest, longest, then the rest from the top); one whose predicted
time would end past `--budget-s` is skipped and listed, and a child still running
`HARD_MARGIN_S` after the budget is stopped, keeping the batches it finished.

    .venv/bin/python experiments/bench/recurrentgemma/bench_recurrentgemma.py          # full
    .venv/bin/python experiments/bench/recurrentgemma/bench_recurrentgemma.py --quick  # minutes
    .venv/bin/python experiments/bench/recurrentgemma/bench_recurrentgemma.py --device-2b --smoke --no-write
    python3 experiments/bench/recurrentgemma/bench_recurrentgemma.py --device-2b --out "$OUT"  # GPU
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
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

# Part 3: the 2B presets on an accelerator (or, with --smoke, the tiny ones anywhere).
DEVICE_PRESETS = {"gemma2": "gemma2_2b", "recurrentgemma": "recurrentgemma_2b"}
SMOKE_PRESETS = {"gemma2": "tiny_gemma2", "recurrentgemma": "tiny_recurrentgemma"}
DEVICE_LENGTHS = (256, 1024, 4096, 8192)
SMOKE_LENGTHS = (32, 64)
DEVICE_BATCHES = (1, 8)
DEVICE_PLOT = HERE / "decode_2b_vs_length.png"
DEVICE_COMMAND = "python3 experiments/bench/recurrentgemma/bench_recurrentgemma.py"
DEVICE_BUDGET_S = 390.0  # no cell is started that is predicted to end later than this
HARD_MARGIN_S = 60.0  # a child still running this long after the budget is stopped
REFUSAL = (
    "--device-2b needs an accelerator, and JAX sees only the CPU ({found}). It will not run the "
    "2B presets on the CPU. Run it where jax[cuda] sees a GPU, or add --smoke to check the code "
    "path with the tiny presets here."
)


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


def device_config(model: str, smoke: bool) -> Any:
    """Part 3's config of one side: the 2B preset (or, for --smoke, the tiny one), bfloat16."""
    from posttrain.models.backbone import get_preset  # any family's presets

    name = (SMOKE_PRESETS if smoke else DEVICE_PRESETS)[model]
    return get_preset(name).replace(dtype="bfloat16", param_dtype="bfloat16")


def probe_worker() -> dict[str, Any]:
    """The device JAX sees first, and the versions of what runs there."""
    import importlib.metadata as metadata

    import jax

    device = jax.devices()[0]
    names = sorted(
        {d.metadata["Name"] for d in metadata.distributions() if d.metadata["Name"]}, key=str.lower
    )
    wanted = [n for n in names if n.lower() in ("jax", "jaxlib", "flax") or "jax-cuda" in n.lower()]
    return dict(
        platform=device.platform,
        device_kind=device.device_kind,
        device_count=jax.device_count(),
        versions=", ".join(f"{n} {metadata.version(n)}" for n in wanted),
    )


def emit(result: dict[str, Any]) -> None:
    """One JSON line to the parent, at once (a child stopped later keeps what it printed)."""
    print(json.dumps(result), flush=True)


def timed_call(compiled: Any, dynamic: tuple, new_tokens: int) -> float:
    """Seconds of one call of the compiled sampler, waited for; checks every row ran to N."""
    import jax

    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*dynamic))
    seconds = time.perf_counter() - start
    assert int(out.lengths.min()) == new_tokens  # no stop token: every row generated N tokens
    return seconds


def decode_worker(
    model: str, smoke: bool, new_tokens: int, batches: list[int], iters: int, min_time: float
) -> None:
    """Part 3, one model at one generated length: init on the device, then per batch an AOT
    compile of the sampler call, a first call and up to `iters` more; one JSON line each."""
    import jax
    import jax.numpy as jnp

    from posttrain.models import init_params
    from posttrain.sampling import generate

    device = jax.devices()[0]
    if device.platform == "cpu" and not smoke:  # the parent checked too; never 2B on the CPU
        raise SystemExit(REFUSAL.format(found=device))
    config = device_config(model, smoke)
    start = time.perf_counter()
    params = jax.block_until_ready(init_params(config, jax.random.key(0)))  # jitted: on device
    leaves = jax.tree.leaves(params)
    emit(
        dict(
            kind="init",
            model=model,
            preset=(SMOKE_PRESETS if smoke else DEVICE_PRESETS)[model],
            params=sum(x.size for x in leaves),
            param_bytes=sum(x.size * x.dtype.itemsize for x in leaves),
            param_dtypes=sorted({str(x.dtype) for x in leaves}),
            on=sorted({str(d) for x in leaves for d in x.devices()}),
            init_s=time.perf_counter() - start,
        )
    )
    for batch in batches:
        tokens = jnp.asarray(prompts(batch, PROMPT_LENGTH, config.vocab_size))
        dynamic = (
            params,
            tokens,
            jnp.ones_like(tokens),
            jax.random.key(0),
            jnp.float32(1.0),  # temperature
            jnp.int32(0),  # top-k off
            jnp.float32(1.0),  # top-p off
        )
        start = time.perf_counter()
        # posttrain's sampler, compiled ahead of time so that no call pays for the compile.
        compiled = generate.lower(
            config, *dynamic, max_new_tokens=new_tokens, stop_ids=()
        ).compile()
        compile_s = time.perf_counter() - start

        times = [timed_call(compiled, dynamic, new_tokens)]
        # A short first call is a warm-up for up to `iters` timed calls; a long one is the
        # measurement itself (the compile is already done).
        while times[0] < min_time and len(times) <= iters and sum(times[1:]) < min_time:
            times.append(timed_call(compiled, dynamic, new_tokens))
        seconds = statistics.median(times[1:]) if len(times) > 1 else times[0]
        stats = device.memory_stats() or {}
        emit(
            dict(
                kind="cell",
                model=model,
                batch=batch,
                new_tokens=new_tokens,
                seconds=seconds,
                times=times,
                compile_s=compile_s,
                tokens_per_s=batch * new_tokens / seconds,
                state_bytes=state_bytes(config, batch, PROMPT_LENGTH + new_tokens),
                peak_device_bytes=stats.get("peak_bytes_in_use"),
            )
        )


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


def stream_worker(
    args: tuple[str, ...], timeout: float, env: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """Run a worker that prints JSON lines: the lines it printed, and why it stopped early (or
    None). A worker past `timeout` seconds is stopped; what it printed until then is kept."""
    command = [sys.executable, __file__, "--worker", *args]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=timeout, env=env
        )
        out, err = result.stdout, result.stderr
        problem = f"exit status {result.returncode}" if result.returncode else None
    except subprocess.TimeoutExpired as stopped:  # subprocess.run has killed the child

        def text(x: str | bytes | None) -> str:
            return x.decode(errors="replace") if isinstance(x, bytes) else x or ""

        out, err = text(stopped.stdout), text(stopped.stderr)
        problem = f"stopped after {timeout:.0f} s (the run's hard limit)"
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    if problem:
        last = [line for line in err.strip().splitlines() if line.strip()][-1:] or [""]
        print(f"worker {' '.join(args)}: {problem}\n{err[-3000:]}", file=sys.stderr)
        problem = f"{problem}: {last[0][:300]}" if last[0] else problem
    return lines, problem


def cell_order(lengths: tuple[int, ...]) -> list[int]:
    """Shortest, longest, then the rest from the top: a run cut short still spans the range."""
    ordered = sorted(set(lengths))
    if len(ordered) <= 2:
        return ordered
    return [ordered[0], ordered[-1], *reversed(ordered[1:-1])]


def predicted_seconds(cells: list[dict], overhead: float, new_tokens: int, args: Any) -> float:
    """A child's time at `new_tokens`, from one of the same model at another length: the same
    overhead (start, init, compiles) and per-step seconds, calls as `decode_worker` makes."""
    total = overhead
    for cell in cells:
        call = cell["seconds"] * new_tokens / cell["new_tokens"]
        total += (
            call if call >= args.min_time else min(args.min_time + call, (1 + args.iters) * call)
        )
    return total


def device_env() -> tuple[dict[str, str], str]:
    """The children's environment: XLA's autotuning results and JAX's compiled programs kept
    in folders, so each (model, length) process reuses the matrix-product choices and the
    parameter initialiser of the ones before it (no sampler program repeats: nothing timed
    changes)."""
    env = dict(os.environ)
    cache = Path(tempfile.gettempdir()) / "bench_recurrentgemma_cache"
    (cache / "autotune").mkdir(parents=True, exist_ok=True)
    flags = env.get("XLA_FLAGS", "")
    if "autotune_cache_dir" not in flags:
        flags = f"{flags} --xla_gpu_per_fusion_autotune_cache_dir={cache / 'autotune'}".strip()
        env["XLA_FLAGS"] = flags
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache / "jax"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return env, flags


def device_rows(args: argparse.Namespace) -> dict[str, Any]:
    """Part 3: every (model, length) in its own child, within the time budget."""
    began = time.perf_counter()
    env, xla_flags = device_env()
    probe, problem = stream_worker(("probe",), 300, env)
    if problem:  # an XLA without that flag aborts at start: try once without it
        env, xla_flags = dict(os.environ), os.environ.get("XLA_FLAGS", "")
        probe, problem = stream_worker(("probe",), 300, env)
    if problem or not probe:
        raise SystemExit(f"the device probe failed: {problem}")
    device = probe[0]
    print(f"device: {device}", file=sys.stderr)
    if device["platform"] == "cpu" and not args.smoke:
        raise SystemExit(REFUSAL.format(found=f"jax.devices()[0] is {device['device_kind']!r}"))
    batches = ",".join(str(b) for b in args.batches)
    inits: dict[str, dict] = {}
    cells: list[dict] = []
    skipped: list[str] = []
    failures: list[str] = []
    unrun: list[int] = []  # lengths a model of which was not started
    known: dict[str, tuple[list[dict], float]] = {}  # model -> (its last cells, overhead)
    hard_limit = args.budget_s + HARD_MARGIN_S
    for new_tokens in cell_order(args.lengths):
        # Both models of a length or neither: a lone side compares with nothing.
        elapsed = time.perf_counter() - began
        guesses = {m: predicted_seconds(*known[m], new_tokens, args) for m in known}
        # A model not yet seen is guessed from the other one.
        guess = sum(guesses.get(m, max(guesses.values(), default=0.0)) for m in MODELS)
        if elapsed + guess > args.budget_s or hard_limit - elapsed < 30:
            unrun.append(new_tokens)
            skipped.append(
                f"N={new_tokens}, both models: not run, predicted {guess:.0f} s from "
                f"{elapsed:.0f} s would end past the {args.budget_s:.0f} s budget"
            )
            print(skipped[-1], file=sys.stderr)
            continue
        for model in MODELS:
            elapsed = time.perf_counter() - began
            if hard_limit - elapsed < 30:
                unrun.append(new_tokens)
                skipped.append(f"{model} N={new_tokens}: not run, {elapsed:.0f} s spent")
                continue
            start = time.perf_counter()
            lines, problem = stream_worker(
                (
                    "decode",
                    model,
                    str(int(args.smoke)),
                    str(new_tokens),
                    batches,
                    str(args.iters),
                    str(args.min_time),
                ),
                hard_limit - elapsed,
                env,
            )
            wall = time.perf_counter() - start
            done = [line for line in lines if line["kind"] == "cell"]
            for line in lines:
                if line["kind"] == "init":
                    inits.setdefault(model, line)  # the first: later ones hit JAX's cache
                print(f"{model} N={new_tokens}: {line}", file=sys.stderr)
            cells += done
            missing = [b for b in args.batches if b not in {c["batch"] for c in done}]
            if problem or missing:
                skipped.append(f"{model} N={new_tokens} B={missing}: {problem or 'no result'}")
                if not (problem or "").startswith("stopped after"):  # not the budget: a fault
                    failures.append(skipped[-1])
            if done:
                calls = sum(sum(c["times"]) for c in done)
                known[model] = (done, wall - calls)
    return dict(
        probe=device,
        inits=inits,
        cells=cells,
        skipped=skipped,
        failures=failures,
        unrun=sorted(set(unrun)),
        xla_flags=xla_flags,
        wall_s=time.perf_counter() - began,
    )


# Report.


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f}" if n < 2**20 * 10 else f"{n / 2**20:.0f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


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


def device_plot(run: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    """Decode tokens/s against generated length, both models, one panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"gemma2": "tab:blue", "recurrentgemma": "tab:orange"}
    fig, axes = plt.subplots(1, len(args.batches), figsize=(5.5 * len(args.batches), 4.2))
    for axis, batch in zip(np.atleast_1d(axes), args.batches, strict=True):
        for model in MODELS:
            mine = sorted(
                (c["new_tokens"], c["tokens_per_s"])
                for c in run["cells"]
                if c["model"] == model and c["batch"] == batch
            )
            if mine:
                name = run["inits"].get(model, {}).get("preset", model)
                axis.plot(*zip(*mine, strict=True), "o-", color=colors[model], label=name)
        axis.set_xscale("log", base=2)
        axis.set_xticks(args.lengths, [str(n) for n in args.lengths])
        axis.set_xlabel("generated tokens (after a 32-token prompt)")
        axis.set_ylabel(f"decode tokens/s (B={batch}, bfloat16)")
        axis.set_ylim(bottom=0)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
        axis.set_title(f"B = {batch}")
    kind = run["probe"]["device_kind"]
    fig.suptitle(
        f"{kind}, posttrain sampler, random init"
        + (" — SMOKE (tiny presets)" if args.smoke else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def device_report(run: dict[str, Any], args: argparse.Namespace) -> str:
    """The markdown results section of Part 3."""
    probe, inits = run["probe"], run["inits"]
    kind = "SMOKE (`--smoke`: tiny presets, not the benchmark)" if args.smoke else "2B presets"
    shapes = {
        "gemma2": "26 layers local/global, d 2304, 8 heads x 256, 4 KV heads, MLP 9216, "
        "vocab 256000, window 4096",
        "recurrentgemma": "26 layers (recurrent, recurrent, attention), d 2560 = lru width, "
        "10 heads x 256, 1 KV head, MLP 7680, vocab 256000, window 2048",
    }
    lines = [
        f"## {datetime.date.today().isoformat()} — {probe['device_kind']}, bfloat16 — "
        f"decode tokens/s against length, {kind}",
        "",
        f"- device: {probe['device_kind']} (JAX platform `{probe['platform']}`, "
        f"{probe['device_count']} device(s) seen, the first one used); host: {cpu_name()}, "
        f"{os.cpu_count()} cores, {platform.system()} {platform.release()}",
        f"- versions: {probe['versions']}; XLA_FLAGS: `{run['xla_flags'] or '(none)'}`",
    ]
    for model in MODELS:
        if model in inits:
            init = inits[model]
            detail = "" if args.smoke else f" ({shapes[model]})"
            lines.append(
                f"- `{init['preset']}`: {_count(init['params'])} parameters, "
                f"{init['param_bytes'] / 2**30:.2f} GiB ({', '.join(init['param_dtypes'])}){detail}; "
                f"random init, jitted on `{', '.join(init['on'])}` in {init['init_s']:.1f} s "
                "(first child)"
            )
    lines += [
        f"- sampling: `posttrain.sampling.generate` through the backbone interface, as Part 1, "
        f"compiled ahead of time (`generate.lower(...).compile()`, its seconds in the table); "
        "B rows of random 32-token prompts, temperature 1, top-k and top-p off, no stop token, "
        "so every row generates all N tokens; bfloat16 parameters, activations and state. A "
        f"first call, then, if it took under {args.min_time:g} s, up to {args.iters} more "
        f"until {args.min_time:g} s of them: s/call is the median of those later calls, or the "
        "first call alone when it took longer. tok/s = B x N / call (the 32-token prefill "
        "included); ms/step = call / N. One child process per model and length.",
        "- state = bytes of the decoding state's arrays at 32 + N tokens (`abstract_state`); "
        "peak = the device allocator's `peak_bytes_in_use` in that child so far (parameters "
        "included; batches run in the order shown)",
        f"- command: `{DEVICE_COMMAND} {shlex.join(sys.argv[1:])}` "
        f"({run['wall_s']:.0f} s; budget {args.budget_s:.0f} s)",
        "",
        "| model | B | generated tokens | tok/s | ms/step | s/call (calls) | state MiB "
        "| peak device MiB | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {m: i for i, m in enumerate(MODELS)}
    cells = sorted(run["cells"], key=lambda c: (order[c["model"]], c["batch"], c["new_tokens"]))
    for c in cells:
        peak = "n/a" if c["peak_device_bytes"] is None else _mib(c["peak_device_bytes"])
        lines.append(
            f"| `{inits.get(c['model'], {}).get('preset', c['model'])}` | {c['batch']} | "
            f"{c['new_tokens']} | {c['tokens_per_s']:.0f} | "
            f"{1000 * c['seconds'] / c['new_tokens']:.2f} | {c['seconds']:.3g} "
            f"({len(c['times'])}) | {_mib(c['state_bytes'])} | {peak} | {c['compile_s']:.1f} |"
        )
    pairs = {(c["model"], c["batch"], c["new_tokens"]): c for c in run["cells"]}
    both = sorted({(b, n) for _, b, n in pairs if all((m, b, n) in pairs for m in MODELS)})
    if both:
        lines += [
            "",
            "| B | generated tokens | Gemma 2 tok/s | RecurrentGemma tok/s | RG / Gemma tok/s "
            "| Gemma / RG state |",
            "|---|---|---|---|---|---|",
        ]
        for b, n in both:
            g, rg = pairs["gemma2", b, n], pairs["recurrentgemma", b, n]
            lines.append(
                f"| {b} | {n} | {g['tokens_per_s']:.0f} | {rg['tokens_per_s']:.0f} | "
                f"**{rg['tokens_per_s'] / g['tokens_per_s']:.2f}x** | "
                f"{g['state_bytes'] / rg['state_bytes']:.1f}x |"
            )
    if run["skipped"]:
        lines += ["", "Not measured:", ""] + [f"- {line}" for line in run["skipped"]]
    if run["unrun"]:
        rest = " ".join(str(n) for n in run["unrun"])
        lines += [
            f"- the lengths not started, in a later call: `{DEVICE_COMMAND} --device-2b "
            f"--lengths {rest}`"
        ]
    lines += ["", f"![decode tokens/s against generated length]({DEVICE_PLOT.name})"]
    return "\n".join(lines) + "\n"


def device_main(args: argparse.Namespace) -> None:
    """Part 3: measure, print the section, write it (not for --smoke) and the plot."""
    args.lengths = tuple(args.lengths or (SMOKE_LENGTHS if args.smoke else DEVICE_LENGTHS))
    args.batches = tuple(args.batches or DEVICE_BATCHES)
    args.iters = 3 if args.iters is None else args.iters
    args.min_time = (0.5 if args.smoke else 3.0) if args.min_time is None else args.min_time
    run = device_rows(args)
    if not run["cells"]:
        raise SystemExit("no cell was measured:\n" + "\n".join(run["skipped"]))
    section = device_report(run, args)
    print(section)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "decode_2b.json").write_text(json.dumps(run, indent=1))
        (out / "decode_2b_section.md").write_text(section)
    if args.smoke:  # draw the plot (to check that code too), never into the results
        where = out or Path(tempfile.mkdtemp(prefix="bench_rg_smoke_"))
        device_plot(run, args, where / DEVICE_PLOT.name)
        print(f"smoke plot: {where / DEVICE_PLOT.name}", file=sys.stderr)
    elif not args.no_write:
        device_plot(run, args, DEVICE_PLOT)
        prepend_results(RESULTS, HEADER, section)
        if out:
            shutil.copy(DEVICE_PLOT, out / DEVICE_PLOT.name)
            shutil.copy(RESULTS, out / RESULTS.name)
    elif out:
        device_plot(run, args, out / DEVICE_PLOT.name)
    if run["failures"]:  # written above all the same, but a fault must not pass silently
        raise SystemExit("children failed:\n" + "\n".join(run["failures"]))


def main() -> None:
    """Run the job (or, with --worker, one measurement) and write the results and the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="lengths 256 and 512, few calls")
    parser.add_argument(
        "--lengths", type=int, nargs="+", help="generated lengths (Part 3: 256 1024 4096 8192)"
    )
    parser.add_argument("--batch", type=int, default=4, help="sampled rows")
    parser.add_argument(
        "--iters", type=int, help="timed calls per cell (default 3, quick 1; Part 3: at most)"
    )
    parser.add_argument("--train-iters", type=int, help="timed steps (default 10, quick 1)")
    parser.add_argument("--train-batch", type=int, help="training rows (default 8, quick 2)")
    parser.add_argument("--train-length", type=int, help="training tokens per row (default 128)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    part3 = parser.add_argument_group("Part 3, 2B decode on an accelerator (--device-2b)")
    part3.add_argument("--device-2b", action="store_true", help="run Part 3 only (needs a GPU)")
    part3.add_argument("--smoke", action="store_true", help="tiny presets, lengths 32 and 64")
    part3.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 1 8)")
    part3.add_argument(
        "--min-time", type=float, help="s of timed calls per cell (default 3, smoke 0.5)"
    )
    part3.add_argument(
        "--budget-s",
        type=float,
        default=DEVICE_BUDGET_S,
        help=f"start no cell predicted to end later (default {DEVICE_BUDGET_S:.0f})",
    )
    part3.add_argument("--out", help="also write the JSON, the section and the plot here")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "probe":
            emit(probe_worker())
            return
        if kind == "decode":
            model, smoke, new_tokens, batches, iters, min_time = rest
            batch_list = [int(b) for b in batches.split(",")]
            decode_worker(
                model, smoke == "1", int(new_tokens), batch_list, int(iters), float(min_time)
            )
            return
        if kind == "sample":
            model, batch, new_tokens, iters = rest
            result = sample_worker(model, int(batch), int(new_tokens), int(iters))
        else:
            side, directory, batch, length, iters = rest
            result = train_worker(side, Path(directory), int(batch), int(length), int(iters))
        print(json.dumps(result))
        return
    if args.device_2b:
        device_main(args)
        return
    if args.smoke:
        parser.error("--smoke goes with --device-2b")

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
