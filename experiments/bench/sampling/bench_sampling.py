"""Decode throughput: posttrain's sampler vs Google Tunix's sampler vs transformers `generate`.

The 4-layer Gemma 2 benchmark shape (d 256, 4 heads x 64, 2 KV heads, hidden 1024, vocab 1024,
window 64), float32, 32-token prompts, sampling at temperature 1 with no stop token so that every
row generates all of its tokens. Each side runs in its own child process of this job (JAX and
PyTorch thread pools fight over the cores when they share a process; see the backbone bench).
Tunix needs `google-tunix`, which pins other versions than the test extra: run this script from
the benchmark environment (`make bench-env`).

    .venv-bench/bin/python experiments/bench/sampling/bench_sampling.py
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
from pathlib import Path

import numpy as np

# Scripts run by path: make `experiments.bench.common` importable from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from experiments.bench.common import median_seconds, prepend_results, tunix_gemma

SHAPE = "bench_gemma2_4l"
PROMPT_LENGTH = 32
RESULTS = Path(__file__).with_name("RESULTS.md")


def prompts(batch: int, vocab: int) -> np.ndarray:
    """Random prompt ids [batch, 32], avoiding the special ids 0-2."""
    return np.random.default_rng(0).integers(3, vocab, (batch, PROMPT_LENGTH)).astype(np.int32)


def posttrain_worker(batch: int, new_tokens: int, directory: Path, iters: int) -> float:
    """Seconds per call of posttrain's sampler."""
    import jax
    import jax.numpy as jnp

    from posttrain.checkpoints import load_hf
    from posttrain.sampling import generate

    config, params = load_hf(directory)
    tokens = jnp.asarray(prompts(batch, config.vocab_size))
    segments = jnp.ones_like(tokens)

    def run():
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

    return median_seconds(run, iters)


class _IdTokenizer:
    """The tokenizer interface Tunix's sampler needs; prompts are space-separated ids."""

    def encode(self, text: str, **_: object) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids, **_: object) -> str:
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self) -> int:
        return 2

    def eos_id(self) -> int:
        return 1

    def pad_id(self) -> int:
        return 0


def tunix_worker(batch: int, new_tokens: int, directory: Path, iters: int) -> float:
    """Seconds per call of Tunix's sampler on a Tunix Gemma of the same shape."""
    from tunix.generate import sampler as tunix_sampler

    from posttrain.checkpoints import load_hf

    config, _ = load_hf(directory)
    model = tunix_gemma(config)
    cache = tunix_sampler.CacheConfig(
        cache_size=2 * (PROMPT_LENGTH + new_tokens),  # Tunix pads prompts to a bucket
        num_layers=config.num_layers,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
    )
    sampler = tunix_sampler.Sampler(model, _IdTokenizer(), cache)
    texts = [" ".join(map(str, row)) for row in prompts(batch, config.vocab_size)]

    def run():
        out = sampler(
            texts,
            max_generation_steps=new_tokens,
            max_prompt_length=PROMPT_LENGTH,
            eos_tokens=[config.vocab_size + 1],  # never sampled: every row runs to the end
            temperature=1.0,
            top_p=1.0,
            seed=0,
        )
        assert min(len(t) for t in out.tokens) == new_tokens

    return median_seconds(run, iters)


def transformers_worker(batch: int, new_tokens: int, directory: Path, iters: int) -> float:
    """Seconds per call of transformers `generate` on the same weights."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.eval()
    tokens = torch.as_tensor(prompts(batch, model.config.vocab_size), dtype=torch.long)

    def run():
        with torch.no_grad():
            out = model.generate(
                tokens,
                attention_mask=torch.ones_like(tokens),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                pad_token_id=0,
            )
        assert out.shape[1] == PROMPT_LENGTH + new_tokens

    return median_seconds(run, iters)


WORKERS = {
    "posttrain": posttrain_worker,
    "tunix": tunix_worker,
    "transformers": transformers_worker,
}


def measure(side: str, batch: int, new_tokens: int, directory: Path, iters: int) -> float | None:
    """Tokens/s of one side in a fresh process of this job (None if it failed)."""
    command = [sys.executable, __file__, "--worker", side, "--batch", str(batch)]
    command += ["--new-tokens", str(new_tokens), "--directory", str(directory)]
    command += ["--iters", str(iters)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"{side} B={batch} N={new_tokens} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
    return batch * new_tokens / seconds


def main() -> None:
    """Run every configuration and write the results table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--new-tokens", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--directory", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        seconds = WORKERS[args.worker](args.batch, args.new_tokens, args.directory, args.iters)
        print(json.dumps({"seconds": seconds}))
        return

    import jax

    from posttrain.checkpoints import save_hf
    from posttrain.models import get_preset, init_params

    config = get_preset(SHAPE)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        save_hf(config, init_params(config, jax.random.key(0)), directory)
        for batch, new_tokens in [(8, 64), (8, 256), (64, 64)]:
            sides = ("posttrain",) if batch == 64 else tuple(WORKERS)
            rate = {s: measure(s, batch, new_tokens, Path(directory), args.iters) for s in sides}
            rows.append((batch, new_tokens, rate))
    fmt = lambda r: "not run" if r == "skip" else ("failed" if r is None else f"{r:.0f}")  # noqa: E731
    ratio = lambda a, b: "—" if a in (None, "skip") or b in (None, "skip") else f"**{a / b:.2f}x**"  # noqa: E731
    lines = [
        f"## {datetime.date.today().isoformat()} — CPU, float32, `{SHAPE}`, 32-token prompts",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        f"- median of {args.iters} calls after a warm-up call (compilation excluded), each side "
        "in its own process; sampling at temperature 1, no stop token, every row generates all",
        "- command: `.venv-bench/bin/python experiments/bench/sampling/bench_sampling.py`",
        "",
        "| B | new tokens | posttrain tok/s | Tunix tok/s | transformers tok/s | vs Tunix | vs transformers |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch, new_tokens, rate in rows:
        ours = rate["posttrain"]
        lines.append(
            f"| {batch} | {new_tokens} | {fmt(ours)} | {fmt(rate.get('tunix', 'skip'))} | "
            f"{fmt(rate.get('transformers', 'skip'))} | {ratio(ours, rate.get('tunix', 'skip'))} | "
            f"{ratio(ours, rate.get('transformers', 'skip'))} |"
        )
    b8 = next(r["posttrain"] for b, n, r in rows if (b, n) == (8, 64))
    b64 = next(r["posttrain"] for b, n, r in rows if (b, n) == (64, 64))
    lines += ["", f"- posttrain B=64 / B=8 tokens/s (64 new tokens): {ratio(b64, b8)}"]
    section = "\n".join(lines) + "\n"
    print(section)
    if not args.no_write:
        prepend_results(
            RESULTS, "# Sampling throughput: posttrain vs Tunix vs transformers\n\n", section
        )


if __name__ == "__main__":
    main()
