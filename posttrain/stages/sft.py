"""The `sft` stage: supervised fine-tuning on chat data, loss on the model turns only.

Writes into the run directory: `checkpoints/` (Orbax, resumable), `hf/` (the final policy as
a Hugging Face directory with its `tokenizer.model`, what later stages take as
`stage.init_checkpoint: sft.checkpoint`), `metrics.jsonl` and its plot, and the summary
(held-out loss, perplexity and, for prompt/response data, greedy exact match).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from posttrain.checkpoints import load_policy
from posttrain.data.prompts import read_rows
from posttrain.data.sft import (
    BatchIterator,
    DataConfig,
    Rows,
    build_examples,
    load_examples,
    to_rows,
)
from posttrain.losses import masked_nll_sum, sequence_token_log_probs
from posttrain.models import BackboneConfig, init_params, param_logical_axes
from posttrain.sampling import SamplingConfig, sample
from posttrain.sharding import activation_sharding, place_on_mesh, shard_batch, shard_params
from posttrain.stages.kit import (
    StageContext,
    settings_from_node,
)
from posttrain.stages.registry import register_stage
from posttrain.train.optim import OptimConfig, make_optimizer, make_schedule
from posttrain.train.step import init_state, make_train_step


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """The stage's own settings."""

    tokenizer: str | None = None  # sentencepiece model; default: the init checkpoint's own
    steps: int = 100
    micro_batches: int = 1  # gradient accumulation: the batch is split into this many parts
    save_every: int = 50
    keep_checkpoints: int = 3
    init_checkpoint: str | None = (
        None  # HF directory or official Orbax checkpoint (shape: `model=`); None = random init
    )
    skip_nonfinite: bool = False
    eval_batches: int = 4
    exact_match_examples: int = 64  # greedy-decoded held-out prompts (prompt/response data)
    max_new_tokens: int = 32
    sample_every: int = 100  # log a table of greedy answers to held-out prompts every N steps
    chunk_size: int = 8192  # vocabulary chunk of the cross-entropy

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batches", "keep_checkpoints", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"stage.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("save_every", "eval_batches", "exact_match_examples", "sample_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"stage.{name} must be >= 0, got {getattr(self, name)}")


def sft_loss_terms(config: BackboneConfig, chunk_size: int):
    """(params, rows) -> (summed NLL of model-turn targets, their count)."""

    def loss_terms(params, rows: Rows):
        tokens, loss_mask, segments = rows
        # A target counts when it is a model-turn token of the same document as its input.
        mask = loss_mask[:, 1:] & (segments[:, 1:] == segments[:, :-1])
        log_probs = sequence_token_log_probs(
            config, params, tokens[:, :-1], tokens[:, 1:], segments[:, :-1], chunk_size
        )
        return masked_nll_sum(log_probs, mask)

    return loss_terms


def evaluate_loss(loss_terms, params, rows: Rows, batch_size: int, max_batches: int) -> float:
    """Token-mean held-out loss over up to `max_batches` batches."""
    jitted = jax.jit(loss_terms)
    total = count = 0.0
    for start in range(0, min(len(rows.tokens), batch_size * max_batches), batch_size):
        batch = Rows(*(a[start : start + batch_size] for a in rows))
        loss_sum, tokens = jitted(params, batch)
        total, count = total + float(loss_sum), count + float(tokens)
    return total / max(count, 1.0)


def exact_match(
    config, params, tokenizer, rows: list[dict], max_new_tokens: int
) -> tuple[float, list]:
    """Fraction of prompt/response rows whose greedy answer equals the response exactly."""
    prompts = [
        tokenizer.encode_chat(
            [{"role": "user", "content": r["prompt"]}], add_generation_prompt=True
        )
        for r in rows
    ]
    out = sample(config, params, prompts, SamplingConfig(max_new_tokens, temperature=0.0))
    answers = [
        tokenizer.decode([int(t) for t in out.tokens[i, : int(out.lengths[i])]])
        .removesuffix("<end_of_turn>")
        .strip()
        for i in range(len(rows))
    ]
    hits = [a == r["response"].strip() for a, r in zip(answers, rows, strict=True)]
    table = [[r["prompt"], a, r["response"]] for r, a in zip(rows, answers, strict=True)]
    return float(np.mean(hits)), table


def memory_estimate(config: BackboneConfig, optim: OptimConfig, stage: SFTConfig, data, mesh):
    """Per-device memory of this SFT run, from abstract shapes."""
    from posttrain.train.memory import estimate_training_memory

    return estimate_training_memory(
        config,
        make_optimizer(optim),
        data.batch_size,
        data.max_length,
        mesh,
        micro_batches=stage.micro_batches,
        chunk_size=stage.chunk_size,
    )


@register_stage(
    "sft",
    groups=("stage", "data", "model", "optim", "logger"),
    trains=True,
    headline=("eval_exact_match", "eval_loss", "eval_perplexity", "steps"),
)
def run(ctx: StageContext) -> dict[str, Any]:
    """Run the stage; returns its metrics."""
    stage = ctx.settings(SFTConfig)
    data = settings_from_node(DataConfig, ctx.cfg.data, "data")
    optim = ctx.optim()
    config = ctx.model_config()
    if ctx.cfg.dry_run:
        config = ctx.checkpoint_config(stage.init_checkpoint)
        return ctx.dry_run_report(config, memory_estimate(config, optim, stage, data, ctx.mesh))

    tokenizer = ctx.tokenizer(stage.tokenizer, stage.init_checkpoint)
    if stage.init_checkpoint:
        config, params = load_policy(stage.init_checkpoint, config)
        ctx.check_vocab(config, tokenizer, stage.init_checkpoint)
    else:
        # A random model takes the tokenizer's vocabulary, and the logged config says so.
        config = config.replace(vocab_size=tokenizer.vocab_size)
        ctx.record_model_vocab(tokenizer.vocab_size)
    ctx.check_memory(memory_estimate(config, optim, stage, data, ctx.mesh), "this SFT run")
    examples, stats = load_examples(data.train, tokenizer, data)
    batches = BatchIterator(
        to_rows(examples, data.max_length, data.packing), data.batch_size, data.seed
    )
    eval_rows = read_rows(data.eval, data.split, columns=data.columns)[0] if data.eval else []
    if not stage.init_checkpoint:
        params = init_params(config, jax.random.key(ctx.cfg.seed))

    mesh = ctx.mesh
    params = shard_params(params, param_logical_axes(config), mesh)
    optimizer = make_optimizer(optim)
    loss_terms = sft_loss_terms(config, stage.chunk_size)
    jitted_step = make_train_step(loss_terms, optimizer, stage.micro_batches)

    def step_fn(state, rows):
        with activation_sharding(mesh):
            return jitted_step(state, shard_batch(rows, mesh))

    sample_rows = [r for r in eval_rows if "prompt" in r and "response" in r][:8]

    def on_step(step: int, metrics: dict[str, float], state) -> None:
        if stage.sample_every and sample_rows and step % stage.sample_every == 0:
            match, table = exact_match(
                config, state.params, tokenizer, sample_rows, stage.max_new_tokens
            )
            metrics["sample_exact_match"] = match
            ctx.tracker.log_table("train/samples", ["prompt", "answer", "expected"], table, step)

    result = ctx.train(
        place_on_mesh(init_state(params, optimizer, ctx.cfg.seed), mesh),
        step_fn,
        batches,
        stage.steps,
        stage.save_every,
        keep=stage.keep_checkpoints,
        skip_nonfinite=stage.skip_nonfinite,
        schedule=make_schedule(optim),
        on_step=on_step,
    )
    params = result.state.params
    metrics: dict[str, Any] = dict(
        **result.summary(),
        **{f"data_{k}": v for k, v in dataclasses.asdict(stats).items()},
    )
    if result.interrupted:
        return ctx.finish(metrics)
    if eval_rows:
        eval_examples, _ = build_examples(eval_rows, tokenizer, data, data.eval)
        eval_loss = evaluate_loss(
            loss_terms,
            params,
            to_rows(eval_examples, data.max_length, packing=False),
            data.batch_size,
            stage.eval_batches,
        )
        metrics.update(eval_loss=eval_loss, eval_perplexity=math.exp(min(eval_loss, 50.0)))
        if stage.exact_match_examples and all("prompt" in r and "response" in r for r in eval_rows):
            subset = eval_rows[: stage.exact_match_examples]
            match, table = exact_match(config, params, tokenizer, subset, stage.max_new_tokens)
            metrics["eval_exact_match"] = match
            metrics["eval_samples"] = table[:5]
            ctx.tracker.log_table(
                "eval/samples", ["prompt", "answer", "expected"], table[:20], metrics["steps"]
            )
        ctx.tracker.log(
            {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)}, metrics["steps"]
        )
    metrics |= ctx.export_policy(config, params)
    return ctx.finish(metrics)
