"""The `sft` stage: supervised fine-tuning on chat data, loss on the model turns only.

Writes into the run directory: `checkpoints/` (Orbax, resumable), `hf/` (the final policy as
a Hugging Face directory, what later stages take as `policy: sft.checkpoint`) and the metrics
(held-out loss, perplexity and, for prompt/response data, greedy exact match).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from posttrain.checkpoints import load_hf, save_hf
from posttrain.data.prompts import load_rows
from posttrain.data.sft import BatchIterator, DataConfig, Rows, build_examples, to_rows
from posttrain.losses import masked_nll_sum, sequence_token_log_probs
from posttrain.models import ModelConfig, abstract_params, init_params, param_logical_axes
from posttrain.sampling import SamplingConfig, sample
from posttrain.sharding import (
    MeshConfig,
    activation_sharding,
    initialize_distributed,
    make_mesh,
    place_on_mesh,
    shard_batch,
    shard_params,
)
from posttrain.tokenizer import GemmaTokenizer
from posttrain.tracking import Tracker
from posttrain.train.checkpointing import Checkpointer
from posttrain.train.loop import run_training
from posttrain.train.optim import OptimConfig, make_optimizer
from posttrain.train.step import init_state, make_train_step


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """The stage's own settings."""

    tokenizer: str
    steps: int = 100
    micro_batches: int = 1  # gradient accumulation: the batch is split into this many parts
    save_every: int = 50
    keep_checkpoints: int = 3
    init_checkpoint: str | None = None  # HF directory to start from; None = random init
    skip_nonfinite: bool = False
    eval_batches: int = 4
    exact_match_examples: int = 64  # greedy-decoded held-out prompts (prompt/response data)
    max_new_tokens: int = 32
    sample_every: int = 100  # log a table of greedy answers to held-out prompts every N steps
    chunk_size: int = 8192  # vocabulary chunk of the cross-entropy


def model_config(cfg: DictConfig) -> ModelConfig:
    """The ModelConfig of `cfg.model` (fails naming a bad field)."""
    fields = OmegaConf.to_container(cfg.model, resolve=True)
    fields["attention_pattern"] = tuple(fields["attention_pattern"])
    return ModelConfig(**fields)


def sft_loss_terms(config: ModelConfig, chunk_size: int):
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


def dry_run(config: ModelConfig, optim: OptimConfig) -> dict[str, Any]:
    """Parameter count and memory per device from abstract shapes; nothing is allocated."""
    shapes = abstract_params(config)
    count = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
    param_bytes = sum(math.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(shapes))
    optimizer_copies = 2 if optim.name == "adamw" else 0.1  # Adam moments; Adafactor factored
    devices = jax.device_count()
    per_device = param_bytes * (2 + optimizer_copies) / devices  # params, grads, optimizer
    report = dict(
        parameters=count,
        parameter_bytes=param_bytes,
        devices=devices,
        train_state_bytes_per_device_fsdp=int(per_device),
    )
    print(f"[dry run] {count / 1e6:.2f}M parameters; ~{per_device / 2**30:.2f} GiB per device")
    return report


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the stage; returns its metrics."""
    stage = SFTConfig(**{k: v for k, v in OmegaConf.to_container(cfg.stage).items() if k != "name"})
    data = DataConfig(**OmegaConf.to_container(cfg.data, resolve=True))
    optim = OptimConfig(**{**OmegaConf.to_container(cfg.optim), "total_steps": stage.steps})
    config = model_config(cfg)
    if cfg.dry_run:
        return dry_run(config, optim)

    run_dir = Path(cfg.run_dir)
    tokenizer = GemmaTokenizer(stage.tokenizer)
    train_rows = load_rows(data.train, data.split)
    examples, stats = build_examples(train_rows, tokenizer, data, data.train)
    batches = BatchIterator(
        to_rows(examples, data.max_length, data.packing), data.batch_size, data.seed
    )
    eval_rows = load_rows(data.eval, data.split) if data.eval else []

    if stage.init_checkpoint:
        config, params = load_hf(stage.init_checkpoint)
    else:
        config = config.replace(vocab_size=max(config.vocab_size, tokenizer.vocab_size))
        params = init_params(config, jax.random.key(cfg.seed))
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} pieces, model {config.vocab_size}")

    initialize_distributed(cfg.get("coordinator"))
    mesh = make_mesh(MeshConfig(**OmegaConf.to_container(cfg.mesh)))
    params = shard_params(params, param_logical_axes(config), mesh)
    optimizer = make_optimizer(optim)
    loss_terms = sft_loss_terms(config, stage.chunk_size)
    jitted_step = make_train_step(loss_terms, optimizer, stage.micro_batches)

    def step_fn(state, rows):
        with activation_sharding(mesh):
            return jitted_step(state, shard_batch(rows, mesh))

    tracker = Tracker(
        cfg.logger.mode,
        cfg.logger.project,
        run_dir,
        OmegaConf.to_container(cfg, resolve=True),
        group=cfg.logger.group,
        name=cfg.logger.name,
    )
    checkpointer = Checkpointer(run_dir / "checkpoints", keep=stage.keep_checkpoints)
    bar = tqdm(total=stage.steps, desc="sft")

    sample_rows = [r for r in eval_rows if "prompt" in r and "response" in r][:8]

    def on_metrics(step: int, metrics: dict[str, float], state) -> None:
        if stage.sample_every and sample_rows and step % stage.sample_every == 0:
            match, table = exact_match(
                config, state.params, tokenizer, sample_rows, stage.max_new_tokens
            )
            metrics["sample_exact_match"] = match
            tracker.log_table("train/samples", ["prompt", "answer", "expected"], table, step)
        bar.n = step
        bar.set_postfix(
            loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens'] / metrics['seconds']:.0f}"
        )
        bar.refresh()
        tracker.log({f"train/{k}": v for k, v in metrics.items()}, step)

    result = run_training(
        place_on_mesh(init_state(params, optimizer, cfg.seed), mesh),
        step_fn,
        batches,
        checkpointer,
        stage.steps,
        stage.save_every,
        on_metrics,
        stage.skip_nonfinite,
    )
    bar.close()
    checkpointer.close()
    params = result.state.params
    metrics: dict[str, Any] = dict(
        steps=int(result.state.step),
        steps_run=result.steps_run,
        interrupted=result.interrupted,
        resumed_from=result.resumed_from,
        skipped_nonfinite=result.skipped_nonfinite,
        **{f"data_{k}": v for k, v in dataclasses.asdict(stats).items()},
    )
    if result.interrupted:
        tracker.finish()
        return metrics
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
            tracker.log_table(
                "eval/samples", ["prompt", "answer", "expected"], table[:20], metrics["steps"]
            )
        tracker.log(
            {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)}, metrics["steps"]
        )
    save_hf(config, jax.tree.map(np.asarray, params), run_dir / "hf")
    metrics["checkpoint"] = str(run_dir / "hf")
    tracker.finish()
    return metrics
