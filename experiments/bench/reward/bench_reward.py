"""Reward-model training throughput: posttrain's reward step vs TRL's `RewardTrainer`.

Measured: full fine-tuning of a Gemma 2 backbone plus a scalar head with the Bradley-Terry loss,
float32, AdamW (lr 1e-5, global-norm clipping 1.0, no weight decay), B=8 pairs of T=128 tokens
per side (random token ids, every row full length, so neither side pads), on the CPU. Each shape
runs twice: sides drawn independently, and sides sharing their first T/2 tokens (a prompt).

- posttrain: `pair_loss_terms` of `posttrain/stages/reward.py` in `make_train_step`, the same
  jitted step the `reward` stage runs, on a `PreferenceRows` batch; metrics are fetched after
  every step, as the training loop does.
- TRL: `trl.RewardTrainer` on `transformers.Gemma2ForSequenceClassification` (num_labels=1,
  eager attention) built from a `Gemma2Config` with the preset's dimensions, on a pre-tokenized
  dataset of `chosen_ids` / `rejected_ids`. TRL's defaults of `bf16=True` and
  `gradient_checkpointing=True` are turned off so that both sides do the same float32 work
  without recomputation (posttrain's presets have `remat=False`). TRL runs twice: with glibc's
  default allocator, and with the host allocator setting that the `posttrain` command applies
  (`posttrain/host_memory.py`), so the gain from that setting is shown apart.

Each side runs in its own process of this job and stamps the end of every step; a side's step
time is (time of WARM + TIMED steps - time of WARM steps) / TIMED, so compilation, start-up and
the first allocator-warming steps drop out; the median step is reported beside it. Throughput
counts 2·B·T tokens per step (both sides of every pair). The machine is shared: before each side
the job waits (up to `--max-wait` seconds) for the 1-minute load average to fall below 0.5, and
it records the load average before and after each side and the CPU used by other processes
while the side ran (from /proc/stat minus this job's children). Needs the benchmark
environment (`make bench-env`, which installs trl):

    .venv-bench/bin/python experiments/bench/reward/bench_reward.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# Scripts run by path: make `experiments.bench.common` importable from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from experiments.bench.common import cpu_name, package_versions, prepend_results, reuse_host_memory

BATCH, LENGTH, WARM, TIMED = 8, 128, 5, 30
LEARNING_RATE = 1e-5
SHAPES = ("bench_gemma2_4l", "tiny_gemma2")
# Tokens both sides of a pair share: none (independent rows), or half of each side.
PROMPTS = (0, LENGTH // 2)
# TRL runs twice: with glibc's default allocator, as it runs out of the box, and with the host
# allocator setting the `posttrain` command applies (posttrain/host_memory.py), for a
# comparison on equal allocators.
SIDES = ("posttrain", "trl", "trl_host_allocator")
QUIET_LOAD = 0.5  # 1-minute load average under which a side may start
BUSY_OTHERS = 0.5  # cores used by other processes above which a row is marked †
RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Reward-model training throughput: posttrain vs TRL RewardTrainer\n\n"


def pair_tokens(vocab: int, pairs: int, prompt: int) -> tuple[np.ndarray, np.ndarray]:
    """Chosen and rejected rows [pairs, T] of random ids in [3, vocab), no padding; the first
    `prompt` tokens of both sides are the same (the prompt both responses answer)."""
    rng = np.random.default_rng(0)
    chosen = rng.integers(3, vocab, (pairs, LENGTH)).astype(np.int32)
    rejected = rng.integers(3, vocab, (pairs, LENGTH)).astype(np.int32)
    rejected[:, :prompt] = chosen[:, :prompt]
    return chosen, rejected


def step_times(stamps: list[float]) -> dict[str, float]:
    """Seconds per step from end-of-step stamps (stamps[0] = start): difference and median."""
    steps = np.diff(stamps)[WARM:]
    return {
        "difference": (stamps[WARM + TIMED] - stamps[WARM]) / TIMED,
        "median": float(statistics.median(steps)),
        "first": float(stamps[1] - stamps[0]),
    }


def posttrain_worker(shape: str, prompt: int) -> list[float]:
    """End-of-step stamps of WARM + TIMED steps of posttrain's reward train step; with a shared
    prompt, on shared-prompt rows as the reward stage trains by default."""
    import jax

    from posttrain.data.preferences import PreferenceRows
    from posttrain.data.shared_prompt import share_prompts
    from posttrain.models import get_preset, init_params
    from posttrain.rewards.reward_model import init_head
    from posttrain.stages.reward import pair_loss_terms
    from posttrain.train.optim import OptimConfig, make_optimizer
    from posttrain.train.step import init_state, make_train_step

    config = get_preset(shape)
    chosen, rejected = pair_tokens(config.vocab_size, BATCH, prompt)
    ones = np.ones_like(chosen)
    batch = PreferenceRows(
        chosen, ones, rejected, ones, np.zeros(BATCH, np.float32), np.ones(BATCH, np.float32)
    )
    if prompt:
        batch = share_prompts(batch)
    optim = OptimConfig(lr=LEARNING_RATE, schedule="constant", total_steps=WARM + TIMED)
    optimizer = make_optimizer(optim)
    params = {"backbone": init_params(config, jax.random.key(0)), "head": init_head(config)}
    state = init_state(params, optimizer, 0)
    step = make_train_step(pair_loss_terms(config, 0.0), optimizer)
    stamps = [time.perf_counter()]
    for _ in range(WARM + TIMED):
        state, metrics = step(state, batch)
        jax.device_get(metrics)  # the training loop reads the metrics every step
        stamps.append(time.perf_counter())
    return stamps


def gemma2_config(config: Any) -> Any:
    """A transformers Gemma2Config (1 label, eager attention) with a posttrain preset's shape."""
    import transformers

    kinds = {"local": "sliding_attention", "global": "full_attention"}
    return transformers.Gemma2Config(
        vocab_size=config.vocab_size,
        hidden_size=config.embed_dim,
        intermediate_size=config.hidden_dim,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=max(LENGTH, 512),
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_theta": config.rope_base, "rope_type": "default"},
        query_pre_attn_scalar=config.query_pre_attn_scalar or config.head_dim,
        sliding_window=config.sliding_window,
        layer_types=[kinds[kind] for kind in config.layer_types],
        final_logit_softcapping=config.final_logit_softcap,
        attn_logit_softcapping=config.attn_logit_softcap,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        num_labels=1,
        attn_implementation="eager",
    )


def trl_worker(shape: str, prompt: int, directory: Path) -> list[float]:
    """End-of-step stamps of WARM + TIMED steps of TRL's RewardTrainer on transformers' Gemma 2."""
    import datasets
    import torch
    import transformers
    import trl
    from tokenizers import Tokenizer, models

    from posttrain.models import get_preset

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    config = get_preset(shape)
    model = transformers.Gemma2ForSequenceClassification(gemma2_config(config))
    chosen, rejected = pair_tokens(config.vocab_size, BATCH * (WARM + TIMED), prompt)
    dataset = datasets.Dataset.from_dict(
        {"chosen_ids": chosen.tolist(), "rejected_ids": rejected.tolist()}
    )
    # The rows are already token ids; TRL only needs a tokenizer for the pad and eos ids.
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="t0", eos_token="t1"
    )
    args = trl.RewardConfig(
        output_dir=str(directory / "trl"),
        max_steps=WARM + TIMED,
        per_device_train_batch_size=BATCH,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_length=LENGTH,
        bf16=False,
        gradient_checkpointing=False,
        eval_strategy="no",
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )

    stamps: list[float] = []

    class Stamps(transformers.TrainerCallback):
        """Records the start of training and the end of every optimizer step."""

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

    trainer = trl.RewardTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Stamps()],
    )
    trainer.train()
    return stamps


def cpu_busy_seconds() -> float:
    """Seconds all CPUs of this machine have spent busy (not idle or iowait), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user..steal, minus idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """User + system seconds of this job's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_quiet(max_wait: float) -> float:
    """Wait up to `max_wait` s for the 1-minute load average to fall below QUIET_LOAD."""
    deadline = time.monotonic() + max_wait
    while (load := os.getloadavg()[0]) >= QUIET_LOAD and time.monotonic() < deadline:
        time.sleep(10)
    return load


def run_side(side: str, shape: str, prompt: int, max_wait: float) -> dict[str, Any]:
    """One side in a fresh process, with the load around it; 'error' is set if it failed."""
    load_before = wait_for_quiet(max_wait)
    busy, children, start = cpu_busy_seconds(), children_cpu_seconds(), time.monotonic()
    command = [sys.executable, __file__, "--worker", side, "--shape", shape]
    command += ["--prompt", str(prompt)]
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.monotonic() - start
    others = (cpu_busy_seconds() - busy - (children_cpu_seconds() - children)) / wall
    record = {"load_before": load_before, "load_after": os.getloadavg()[0], "others": others}
    if done.returncode != 0:
        print(f"{side} {shape} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return record | {"error": done.stderr[-300:]}
    return record | step_times(json.loads(done.stdout.strip().splitlines()[-1]))


def under_load(record: dict[str, Any]) -> bool:
    """Whether other work shared the machine: load before, or others' CPU during the run."""
    return record["load_before"] >= QUIET_LOAD or record["others"] > BUSY_OTHERS


def versions() -> str:
    """The versions of the libraries measured."""
    return package_versions(
        ("jax", "jaxlib", "optax", "torch", "transformers", "trl", "accelerate")
    )


def table(results: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Markdown rows: tok/s of each side, the ratios, and the load around each side."""
    tokens = 2 * BATCH * LENGTH
    lines = [
        "| shape | shared prompt tokens | posttrain tok/s | TRL tok/s | TRL tok/s, same allocator "
        "| posttrain / TRL | posttrain / TRL, same allocator | median-step ratios "
        "| load before→after (others' cores): posttrain; TRL; TRL same allocator |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case, sides in results.items():
        shape, prompt = case.split("@")
        cells, loads = [], []
        for side in SIDES:
            r = sides[side]
            mark = " †" if under_load(r) else ""
            cells.append("failed" if "error" in r else f"{tokens / r['difference']:.0f}{mark}")
            loads.append(f"{r['load_before']:.2f}→{r['load_after']:.2f} ({r['others']:.2f})")
        p = sides["posttrain"]
        ratios, medians = [], []
        for side in SIDES[1:]:
            t = sides[side]
            ok = "error" not in p and "error" not in t
            ratios.append(f"**{t['difference'] / p['difference']:.2f}x**" if ok else "—")
            medians.append(f"{t['median'] / p['median']:.2f}x" if ok else "—")
        lines.append(
            f"| {shape} | {prompt} | {' | '.join(cells)} | {' | '.join(ratios)} "
            f"| {' / '.join(medians)} | {'; '.join(loads)} |"
        )
    return lines


def main() -> None:
    """Run both sides on every shape and prepend the table to RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--shape", action="append", help="preset(s) to run (default: all)")
    parser.add_argument(
        "--prompt", type=int, action="append", help=f"shared prompt tokens (default: {PROMPTS})"
    )
    parser.add_argument("--max-wait", type=float, default=600, help="s to wait for load < 0.5")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    if args.worker:
        import tempfile

        if args.worker != "trl":  # as `posttrain stage=reward` does (host_allocator=auto)
            reuse_host_memory()

        with tempfile.TemporaryDirectory() as directory:
            shape, prompt = args.shape[0], args.prompt[0]
            stamps = (
                posttrain_worker(shape, prompt)
                if args.worker == "posttrain"
                else trl_worker(shape, prompt, Path(directory))
            )
        print(json.dumps(stamps))
        return

    results: dict[str, dict[str, dict[str, Any]]] = {}
    for shape in args.shape or SHAPES:
        for prompt in args.prompt or PROMPTS:
            case = f"{shape}@{prompt}"
            results[case] = {side: run_side(side, shape, prompt, args.max_wait) for side in SIDES}
            print(case, json.dumps(results[case]), flush=True)
    lines = [
        f"## {datetime.date.today().isoformat()} — CPU ({os.cpu_count()} cores), float32, "
        f"B={BATCH} pairs, T={LENGTH} per side, AdamW lr {LEARNING_RATE:g}, full fine-tuning",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}",
        f"- versions: {versions()}",
        f"- tok/s = 2·B·T = {2 * BATCH * LENGTH} tokens per step / step time; step time = (time "
        f"of {WARM + TIMED} steps - time of {WARM}) / {TIMED}, each side in a fresh process of "
        "this job; the median-step column is TRL's median step / posttrain's",
        "- TRL: `Gemma2ForSequenceClassification` (eager attention), `RewardConfig(bf16=False, "
        "gradient_checkpointing=False)`, torch threads = cores; posttrain: `pair_loss_terms` in "
        "`make_train_step`, remat off; with a shared prompt, posttrain trains on shared-prompt "
        "rows (`share_prompts`, the reward stage's default), TRL on the same two full sides",
        "- allocator: posttrain runs with the host allocator setting `posttrain stage=reward` applies "
        "(`posttrain/host_memory.py`); TRL runs once with glibc's defaults and once with the "
        "same setting (the 'same allocator' columns)",
        f"- † = taken under load: 1-min load average ≥ {QUIET_LOAD} before the side, or other "
        f"processes used > {BUSY_OTHERS} cores while it ran (the load after includes the side)",
        "- command: `.venv-bench/bin/python experiments/bench/reward/bench_reward.py`",
        "",
        *table(results),
    ]
    section = "\n".join(lines) + "\n"
    print(section)
    if not args.no_write:
        prepend_results(RESULTS, HEADER, section)


if __name__ == "__main__":
    main()
