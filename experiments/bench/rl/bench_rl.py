"""Seconds per RL step: posttrain's `reinforce` step vs Tunix's GRPO learner vs TRL's RLOOTrainer.

Measured: one on-policy step of p=4 prompts x k=4 samples, 32 prompt tokens and 64 new tokens
per sample (temperature 1, no truncation, a stop token the model can never sample, so every
sample is 64 tokens), on a randomly initialised `bench_gemma2_4l` (4-layer Gemma 2, d 256,
vocab 1024), float32, on the CPU. The reward is the same cheap rule on every side: the share of
the response's token ids that are even, read back from the decoded text (each side's tokenizer
decodes an id i to a word holding the number i). AdamW lr 1e-5, constant, gradient-norm
clipping 1.0, KL coefficient beta 0.05 to a frozen reference (a copy of the initial weights).

- posttrain: `RolloutSource.next_batch` (one prefill per prompt continued by its k rows,
  decode, score, reference log-probs) then the `reinforce` stage's jitted step
  (`reinforce_loss_terms` with the RLOO baseline in `make_train_step(..., uses_extras=True,
  update_extras=...)`); the split is the source's own `seconds` (generation, scoring,
  reference) plus the update.
- Tunix: `tunix.rl.grpo.GrpoLearner` (GRPOConfig num_generations=4, beta 0.05) on a
  `RLCluster` of a Tunix Gemma 2 of the same shape (actor, and a copy as reference) with
  Tunix's vanilla rollout engine; a step is the period between its reward calls (one per
  step, after the rollout), so it holds one update and the next rollout.
- TRL: `trl.RLOOTrainer` (num_generations=4, max_completion_length=64, beta 0.05) on a
  transformers `Gemma2ForCausalLM` of the same shape (eager attention), torch threads = cores;
  a callback stamps the end of every optimizer step of one `trainer.train()`. TRL still stops
  at the config's eos (id 1) as well, so about 6% of its samples end early.

Each side runs WARM + TIMED steps in its own process of this job (JAX and PyTorch thread pools
fight over the cores when they share one); the sides run interleaved ROUNDS times. Reported:
the median of the TIMED steps after WARM warm-up steps. Needs the benchmark environment
(`make bench-env`, which installs google-tunix and trl):

    .venv-bench/bin/python experiments/bench/rl/bench_rl.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

# Scripts run by path: make `experiments.bench.common` importable from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from experiments.bench.common import cpu_name, package_versions, prepend_results, tunix_gemma

SHAPE = "bench_gemma2_4l"
PROMPTS, SAMPLES, PROMPT_LENGTH, NEW_TOKENS = 4, 4, 32, 64
WARM, TIMED, ROUNDS = 2, 5, 3
LEARNING_RATE, BETA = 1e-5, 0.05
SIDES = ("posttrain", "tunix", "trl")
RESULTS = Path(__file__).with_name("RESULTS.md")
HEADER = "# Seconds per RL step: posttrain vs Tunix GRPO vs TRL RLOO\n\n"


def prompt_ids(vocab: int) -> np.ndarray:
    """The p prompts [p, 32] of random ids in [3, vocab) (no pad, eos or bos)."""
    rng = np.random.default_rng(0)
    return rng.integers(3, vocab, (PROMPTS, PROMPT_LENGTH)).astype(np.int32)


def even_share(texts: list[str]) -> list[float]:
    """The rule reward: the share of the numbers in each text (the token ids) that are even."""
    out = []
    for text in texts:
        ids = [int(n) for n in re.findall(r"\d+", text)]
        out.append(sum(i % 2 == 0 for i in ids) / max(len(ids), 1))
    return out


class IdTokenizer:
    """A stand-in tokenizer: text is space-separated ids. It has the methods posttrain's rollouts
    (encode with add_bos, decode) and Tunix's sampler (encode, decode, bos/eos/pad ids) call."""

    def __init__(self, eos: int) -> None:
        self.eos = eos

    def encode(self, text: str, add_bos: bool = False, **_: object) -> list[int]:
        ids = [int(t) for t in str(text).split()]
        return [2, *ids] if add_bos else ids

    def decode(self, ids: Any, **_: object) -> str:
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self) -> int:
        return 2

    def eos_id(self) -> int:
        return self.eos

    def pad_id(self) -> int:
        return 0


def posttrain_worker() -> dict[str, list[float]]:
    """Per-step seconds (total and split) of posttrain's rollouts + reinforce step."""
    import jax
    import jax.numpy as jnp

    from posttrain.models import get_preset, init_params
    from posttrain.rl.rollouts import RolloutSource
    from posttrain.sampling.sampler import SamplingConfig
    from posttrain.stages.reinforce import (
        ReinforceConfig,
        reinforce_loss_terms,
        update_extras_fn,
    )
    from posttrain.train.optim import OptimConfig, make_optimizer
    from posttrain.train.step import init_state, make_train_step

    config = get_preset(SHAPE)
    # The source adds <bos>: 31 ids + <bos> = the 32 prompt tokens of the other sides.
    texts = [" ".join(map(str, row[1:])) for row in prompt_ids(config.vocab_size)]
    stage = ReinforceConfig(
        init_checkpoint="",
        prompts="",
        reward=None,
        prompts_per_step=PROMPTS,
        samples_per_prompt=SAMPLES,
        beta=BETA,
        baseline="rloo",
        max_new_tokens=NEW_TOKENS,
    )
    params = init_params(config, jax.random.key(0))
    reference = jax.tree.map(jnp.copy, params)
    source = RolloutSource(
        config,
        IdTokenizer(eos=config.vocab_size + 1),
        texts,
        lambda prompts, responses: np.asarray(even_share(responses), np.float32),
        SamplingConfig(max_new_tokens=NEW_TOKENS, stop_ids=()),
        PROMPTS,
        SAMPLES,
        lambda state: reference,
        chat=False,
    )
    optim = OptimConfig(lr=LEARNING_RATE, schedule="constant", total_steps=WARM + TIMED)
    optimizer = make_optimizer(optim)
    state = init_state(params, optimizer, 0, {"baseline": jnp.zeros((), jnp.float32)})
    step = make_train_step(
        reinforce_loss_terms(config, stage),
        optimizer,
        uses_extras=True,
        update_extras=update_extras_fn(stage),
    )
    record: dict[str, list[float]] = {
        key: [] for key in ("step", "generation", "scoring", "reference", "update")
    }
    for _ in range(WARM + TIMED):
        started = time.perf_counter()
        batch = source.next_batch(state)
        rolled = time.perf_counter()
        state, metrics = step(state, batch)
        jax.device_get(metrics)  # the training loop reads the metrics every step
        done = time.perf_counter()
        assert int(batch.lengths.min()) == NEW_TOKENS
        record["step"].append(done - started)
        record["update"].append(done - rolled)
        for key in ("generation", "scoring", "reference"):
            record[key].append(source.seconds[key])
    return record


def tunix_worker() -> dict[str, list[float]]:
    """Per-step seconds of Tunix's GRPO learner: the period between its reward calls (one call
    per step, after the rollout), so each period holds one update and the next rollout."""
    import jax
    import optax
    from flax import nnx
    from tunix.rl import rl_cluster as rl_cluster_lib
    from tunix.rl.grpo import grpo_learner
    from tunix.rl.rollout import base_rollout

    from posttrain.models import get_preset

    config = get_preset(SHAPE)
    steps = WARM + TIMED + 1  # the last period ends at the reward call of one more step
    actor = tunix_gemma(config)
    reference = nnx.clone(actor)
    auto = (jax.sharding.AxisType.Auto,) * 2  # Tunix annotates shardings, Explicit breaks them
    mesh = jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=auto)
    roles = rl_cluster_lib.Role
    rollout = base_rollout.RolloutConfig(
        max_tokens_to_generate=NEW_TOKENS,
        max_prompt_length=PROMPT_LENGTH,
        kv_cache_size=2 * (PROMPT_LENGTH + NEW_TOKENS),  # Tunix pads prompts to a bucket
        temperature=1.0,
        top_p=1.0,
        top_k=None,
        eos_tokens=[config.vocab_size + 1],  # never sampled: every sample runs to the end
    )
    training = rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optax.chain(
            optax.clip_by_global_norm(1.0), optax.adamw(LEARNING_RATE, weight_decay=0.0)
        ),
        eval_every_n_steps=10**6,
        max_steps=steps,
        mini_batch_size=PROMPTS,
        train_micro_batch_size=PROMPTS,
    )
    cluster = rl_cluster_lib.RLCluster(
        actor=actor,
        reference=reference,
        tokenizer=IdTokenizer(eos=config.vocab_size + 1),
        cluster_config=rl_cluster_lib.ClusterConfig(
            role_to_mesh={roles.ACTOR: mesh, roles.REFERENCE: mesh, roles.ROLLOUT: mesh},
            rollout_engine="vanilla",
            offload_to_cpu=False,
            training_config=training,
            rollout_config=rollout,
        ),
    )
    stamps: list[float] = []

    def reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        stamps.append(time.perf_counter())
        return even_share(completions)

    learner = grpo_learner.GrpoLearner(
        rl_cluster=cluster,
        algo_config=grpo_learner.GRPOConfig(num_generations=SAMPLES, beta=BETA),
        reward_fns=reward,
    )
    texts = [" ".join(map(str, row)) for row in prompt_ids(config.vocab_size)]
    learner.train([{"prompts": np.asarray(texts)} for _ in range(steps)])
    return {"step": np.diff(stamps).tolist()}


def trl_worker(directory: Path) -> dict[str, list[float]]:
    """Per-step seconds of TRL's RLOOTrainer, from a callback's end-of-step stamps."""
    import datasets
    import torch
    import transformers
    import trl
    from tokenizers import Tokenizer, models, pre_tokenizers

    from experiments.bench.reward.bench_reward import gemma2_config
    from posttrain.models import get_preset

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    config = get_preset(SHAPE)
    # TRL builds its reference from the policy's path: save the random policy and pass the path.
    policy = directory / "policy"
    hf_config = gemma2_config(config)
    # The config's eos (id 1) would end some completions early; id 1024 is never sampled.
    hf_config.eos_token_id = config.vocab_size
    model = transformers.Gemma2ForCausalLM(hf_config)
    model.generation_config.eos_token_id = config.vocab_size
    model.save_pretrained(policy)
    # Words t0..t1024 are ids 0..1024; eos is id 1024, outside the model's vocabulary, so it is
    # never sampled and every completion runs to max_completion_length.
    vocab = {f"t{i}": i for i in range(config.vocab_size + 1)}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="t0", eos_token=f"t{config.vocab_size}"
    )
    steps = WARM + TIMED
    texts = [" ".join(f"t{i}" for i in row) for row in prompt_ids(config.vocab_size)]
    dataset = datasets.Dataset.from_dict({"prompt": texts * steps})
    args = trl.RLOOConfig(
        output_dir=str(directory / "trl"),
        max_steps=steps,
        per_device_train_batch_size=PROMPTS * SAMPLES,  # completions per step
        num_generations=SAMPLES,
        max_completion_length=NEW_TOKENS,
        temperature=1.0,
        beta=BETA,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=False,
        gradient_checkpointing=False,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        model_init_kwargs={"dtype": torch.float32, "attn_implementation": "eager"},
    )
    stamps: list[float] = []

    class Stamps(transformers.TrainerCallback):
        """Records the start of training and the end of every optimizer step."""

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            stamps.append(time.perf_counter())

    def reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        return even_share(completions)

    trainer = trl.RLOOTrainer(
        model=str(policy),
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Stamps()],
    )
    trainer.train()
    return {"step": np.diff(stamps).tolist()}


def run_side(side: str) -> dict[str, Any]:
    """One side in a fresh process: median seconds of its timed steps (and of its split)."""
    load = os.getloadavg()[0]
    done = subprocess.run(
        [sys.executable, __file__, "--worker", side], capture_output=True, text=True
    )
    if done.returncode != 0:
        print(f"{side} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return {"error": done.stderr[-300:], "load": load}
    record = json.loads(done.stdout.strip().splitlines()[-1])
    out = {key: statistics.median(v[WARM : WARM + TIMED]) for key, v in record.items()}
    return out | {"load": load}


def versions() -> str:
    """The versions of the libraries measured."""
    return package_versions(
        ("jax", "jaxlib", "flax", "google-tunix", "torch", "transformers", "trl")
    )


def main() -> None:
    """Run the three sides interleaved ROUNDS times and prepend the table to RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    if args.worker:
        import tempfile

        with tempfile.TemporaryDirectory() as directory:
            if args.worker == "trl":
                record = trl_worker(Path(directory))
            else:
                record = posttrain_worker() if args.worker == "posttrain" else tunix_worker()
        print(json.dumps(record))
        return

    rounds = []
    for _ in range(args.rounds):
        rounds.append({side: run_side(side) for side in SIDES})
        print(json.dumps(rounds[-1]), flush=True)

    def cell(r: dict[str, Any]) -> str:
        return "failed" if "error" in r else f"{r['step']:.3f}"

    def ratio(ours: dict[str, Any], theirs: dict[str, Any]) -> str:
        ok = "error" not in ours and "error" not in theirs
        return f"**{theirs['step'] / ours['step']:.2f}x**" if ok else "—"

    lines = [
        f"## {datetime.date.today().isoformat()} — CPU ({os.cpu_count()} cores), float32, "
        f"p={PROMPTS} prompts x k={SAMPLES} samples, {PROMPT_LENGTH} prompt + {NEW_TOKENS} new "
        f"tokens, {SHAPE}",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}",
        f"- versions: {versions()}",
        f"- step seconds: median of {TIMED} steps after {WARM} warm-up steps, each side in a "
        f"fresh process of this job, the three sides interleaved {args.rounds} times",
        "- command: `.venv-bench/bin/python experiments/bench/rl/bench_rl.py`",
        "",
        "| round | posttrain s/step | Tunix GRPO s/step | TRL RLOO s/step | Tunix / posttrain "
        "| TRL / posttrain | posttrain split: generation / scoring / reference / update s "
        "| 1-min load before each side |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rounds, 1):
        ours = r["posttrain"]
        split = (
            " / ".join(f"{ours[k]:.3f}" for k in ("generation", "scoring", "reference", "update"))
            if "error" not in ours
            else "—"
        )
        loads = " / ".join(f"{r[side]['load']:.2f}" for side in SIDES)
        lines.append(
            f"| {i} | {cell(ours)} | {cell(r['tunix'])} | {cell(r['trl'])} "
            f"| {ratio(ours, r['tunix'])} | {ratio(ours, r['trl'])} | {split} | {loads} |"
        )
    section = "\n".join(lines) + "\n"
    print(section)
    if not args.no_write:
        prepend_results(RESULTS, HEADER, section)


if __name__ == "__main__":
    main()
