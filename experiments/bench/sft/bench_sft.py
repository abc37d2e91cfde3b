"""SFT training throughput: posttrain vs Google Tunix's PeftTrainer vs TRL's SFTTrainer.

Same shapes (the 4-layer Gemma 2 shape and the ~30M one), B=8, T=128, float32, AdamW, full
fine-tuning on random token rows whose second half is the trained answer. Each side runs in its
own process of this job; a side's step time is (time of 3 + N steps - time of 3 steps) / N, so
compilation and start-up cancel out. posttrain runs with the host allocator setting that
`posttrain stage=sft` applies (`posttrain/host_memory.py`); Tunix and TRL run once with glibc's
defaults, as they run out of the box, and once with the same setting ("same allocator"). Needs
the benchmark environment (`make bench-env`, which also has trl).

    .venv-bench/bin/python experiments/bench/sft/bench_sft.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Scripts run by path: make `experiments.bench.common` importable from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from experiments.bench.common import prepend_results, reuse_host_memory, tunix_gemma

BATCH, LENGTH, WARM, TIMED = 8, 128, 3, 10
SHAPES = ("bench_gemma2_4l", "bench_gemma2_30m")
RESULTS = Path(__file__).with_name("RESULTS.md")


def rows(vocab: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Token rows [count, T] and a loss mask on the second half."""
    tokens = np.random.default_rng(0).integers(3, vocab, (count, LENGTH)).astype(np.int32)
    mask = np.zeros_like(tokens, bool)
    mask[:, LENGTH // 2 :] = True
    return tokens, mask


def posttrain_worker(shape: str, steps: int, directory: Path) -> float:
    """Seconds for `steps` SFT steps of posttrain's train step (compile included)."""
    import jax
    import optax

    from posttrain.data.sft import Rows
    from posttrain.models import get_preset, init_params
    from posttrain.stages.sft import sft_loss_terms
    from posttrain.train.step import init_state, make_train_step

    config = get_preset(shape)
    tokens, mask = rows(config.vocab_size, BATCH)
    batch = Rows(tokens, mask, np.ones_like(tokens))
    optimizer = optax.adamw(1e-4)
    state = init_state(init_params(config, jax.random.key(0)), optimizer, 0)
    step = make_train_step(sft_loss_terms(config, 8192), optimizer)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start


def tunix_worker(shape: str, steps: int, directory: Path) -> float:
    """Seconds for `steps` steps of Tunix's PeftTrainer (full fine-tuning) on its Gemma."""
    import jax
    import optax
    from flax import nnx
    from tunix.sft import peft_trainer
    from tunix.sft import utils as sft_utils

    from posttrain.models import get_preset

    config = get_preset(shape)
    model = tunix_gemma(config)
    tokens, mask = rows(config.vocab_size, BATCH)
    data = [peft_trainer.TrainingInput(input_tokens=tokens, input_mask=mask)] * steps

    def model_input(x):
        valid = x.input_tokens != 0
        return {
            "input_tokens": x.input_tokens,
            "input_mask": x.input_mask,
            "positions": sft_utils.build_positions_from_mask(valid),
            "attention_mask": sft_utils.make_causal_attn_mask(valid),
        }

    training = peft_trainer.TrainingConfig(eval_every_n_steps=10**9, max_steps=steps)
    trainer = peft_trainer.PeftTrainer(model, optax.adamw(1e-4), training)
    trainer = trainer.with_gen_model_input_fn(model_input)
    start = time.perf_counter()
    trainer.train(data)
    jax.block_until_ready(nnx.state(model))
    return time.perf_counter() - start


def trl_worker(shape: str, steps: int, directory: Path) -> float:
    """Seconds for `steps` steps of TRL's SFTTrainer on transformers' Gemma 2 (CPU)."""
    import datasets
    import torch
    import transformers
    import trl

    torch.set_num_threads(os.cpu_count() or 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    )
    tokens, mask = rows(model.config.vocab_size, BATCH * steps)
    dataset = datasets.Dataset.from_dict(
        {"input_ids": tokens.tolist(), "completion_mask": mask.astype(int).tolist()}
    )
    args = trl.SFTConfig(
        output_dir=str(directory / "trl"),
        max_steps=steps,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-4,
        max_length=LENGTH,
        completion_only_loss=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )

    from tokenizers import Tokenizer, models

    # The rows are already token ids; TRL only needs a tokenizer for padding and ids.
    vocab = {f"t{i}": i for i in range(model.config.vocab_size)}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="t0", eos_token="t1"
    )
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


WORKERS = {
    "posttrain": posttrain_worker,
    "tunix": tunix_worker,
    "trl": trl_worker,
    "tunix_host_allocator": tunix_worker,
    "trl_host_allocator": trl_worker,
}
# Sides that run with posttrain's host allocator setting, set before anything else.
REUSING_HOST_MEMORY = ("posttrain", "tunix_host_allocator", "trl_host_allocator")


def seconds_per_step(side: str, shape: str, directory: Path) -> float | None:
    """(time of WARM + TIMED steps - time of WARM steps) / TIMED, each in a fresh process."""
    times = []
    for steps in (WARM, WARM + TIMED):
        command = [sys.executable, __file__, "--worker", side, "--shape", shape]
        command += ["--steps", str(steps), "--directory", str(directory)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{side} {shape} failed:\n{done.stderr[-2500:]}", file=sys.stderr)
            return None
        times.append(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])
    return (times[1] - times[0]) / TIMED


def main() -> None:
    """Run all sides on all shapes and write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--directory", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.worker:
        if args.worker in REUSING_HOST_MEMORY:
            reuse_host_memory()
        seconds = WORKERS[args.worker](args.shape, args.steps, args.directory)
        print(json.dumps({"seconds": seconds}))
        return

    import jax

    from posttrain.checkpoints import save_hf
    from posttrain.models import get_preset, init_params

    fmt = lambda s: "failed" if s is None else f"{BATCH * LENGTH / s:.0f}"  # noqa: E731
    ratio = lambda a, b: "—" if a is None or b is None else f"**{b / a:.2f}x**"  # noqa: E731
    lines = [
        f"## {datetime.date.today().isoformat()} — CPU ({os.cpu_count()} cores), float32, "
        f"B={BATCH}, T={LENGTH}, AdamW, full fine-tuning",
        "",
        f"- tokens/s from (time of {WARM + TIMED} steps - time of {WARM}) / {TIMED}, each side "
        "in fresh processes of this job",
        "- command: `.venv-bench/bin/python experiments/bench/sft/bench_sft.py`",
        "- posttrain with the host allocator setting of `posttrain stage=sft`; Tunix and TRL with "
        "glibc's defaults, and with the same setting in the 'same allocator' columns",
        "",
        "| shape | posttrain tok/s | Tunix PeftTrainer tok/s | TRL SFTTrainer tok/s "
        "| Tunix, same allocator | TRL, same allocator | vs Tunix | vs TRL "
        "| vs Tunix, same allocator | vs TRL, same allocator |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in SHAPES:
        config = get_preset(shape)
        with tempfile.TemporaryDirectory() as directory:
            save_hf(config, init_params(config, jax.random.key(0)), directory)
            s = {side: seconds_per_step(side, shape, Path(directory)) for side in WORKERS}
        peers = ("tunix", "trl", "tunix_host_allocator", "trl_host_allocator")
        lines.append(
            f"| {shape} | {fmt(s['posttrain'])} | "
            + " | ".join(fmt(s[p]) for p in peers)
            + " | "
            + " | ".join(ratio(s["posttrain"], s[p]) for p in peers)
            + " |"
        )
        print(lines[-1], flush=True)
    section = "\n".join(lines) + "\n"
    print(section)
    if not args.no_write:
        prepend_results(RESULTS, "# SFT throughput: posttrain vs Tunix vs TRL\n\n", section)


if __name__ == "__main__":
    main()
