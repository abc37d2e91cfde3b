"""The `reward` stage: a Bradley-Terry reward model on preference pairs.

Starts from an SFT checkpoint (the backbone) and a head that is zero or fitted by a linear probe
on frozen features; trains both with -log σ(r⁺ - r⁻ - m) (+ optional centering). Writes the
reward model to `<run_dir>/reward_model/` (backbone as a Hugging Face directory, head as
`head.safetensors`) and reports pairwise accuracy, mean margin and reward mean/std on the
training and held-out pairs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig, OmegaConf
from safetensors.numpy import save_file
from tqdm import tqdm

from posttrain.checkpoints import load_hf, save_hf
from posttrain.data.preferences import PreferenceRows, build_preferences
from posttrain.data.prompts import load_rows
from posttrain.data.sft import BatchIterator
from posttrain.losses.bradley_terry import bradley_terry_loss, preference_metrics
from posttrain.rewards.reward_model import (
    fit_linear_probe,
    init_head,
    last_token_features,
    reward_scores,
)
from posttrain.tokenizer import GemmaTokenizer
from posttrain.train.checkpointing import Checkpointer
from posttrain.train.loop import run_training
from posttrain.train.optim import OptimConfig, make_optimizer
from posttrain.train.step import init_state, make_train_step


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """The reward stage's settings."""

    init_checkpoint: str  # SFT checkpoint (Hugging Face directory): the backbone
    tokenizer: str
    train: str  # preference rows: prompt, chosen, rejected[, margin, label]
    eval: str | None = None
    split: str = "train"
    preamble: str | None = None  # instruction to the reward model, prepended to the prompt
    max_length: int = 128
    skip_malformed: bool = False
    batch_size: int = 8  # pairs per step
    steps: int = 100
    save_every: int = 50
    center_coefficient: float = 0.0  # c of c·(r⁺ + r⁻)²
    linear_probe: bool = True  # fit the head on frozen features before training
    probe_pairs: int = 256
    seed: int = 0


def pair_loss_terms(config, center_coefficient: float):
    """(params, pair batch) -> (summed BT loss, number of pairs)."""

    def loss_terms(params, batch: PreferenceRows):
        chosen = reward_scores(config, params, batch.chosen, batch.chosen_segments)
        rejected = reward_scores(config, params, batch.rejected, batch.rejected_segments)
        losses = bradley_terry_loss(chosen, rejected, batch.margin, batch.label, center_coefficient)
        return jnp.sum(losses), jnp.float32(losses.shape[0])

    return loss_terms


def score_pairs(
    config, params, rows: PreferenceRows, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rewards of both sides of every pair."""
    score = jax.jit(lambda p, t, s: reward_scores(config, p, t, s))
    chosen, rejected = [], []
    for start in range(0, len(rows.chosen), batch_size):
        part = slice(start, start + batch_size)
        chosen.append(score(params, rows.chosen[part], rows.chosen_segments[part]))
        rejected.append(score(params, rows.rejected[part], rows.rejected_segments[part]))
    return np.concatenate(chosen), np.concatenate(rejected)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train the reward model; returns its metrics."""
    stage = RewardConfig(
        **{k: v for k, v in OmegaConf.to_container(cfg.stage).items() if k != "name"}
    )
    optim = OptimConfig(**{**OmegaConf.to_container(cfg.optim), "total_steps": stage.steps})
    run_dir = Path(cfg.run_dir)
    tokenizer = GemmaTokenizer(stage.tokenizer)
    config, backbone = load_hf(stage.init_checkpoint)
    build = lambda source: build_preferences(  # noqa: E731
        load_rows(source, stage.split),
        tokenizer,
        stage.max_length,
        source,
        stage.preamble,
        stage.skip_malformed,
    )
    train_rows, stats = build(stage.train)
    if len(train_rows.chosen) < stage.batch_size:
        raise ValueError(
            f"{stage.train}: {len(train_rows.chosen)} pairs < batch size {stage.batch_size}"
        )

    head = init_head(config)
    if stage.linear_probe:
        features = jax.jit(lambda t, s: last_token_features(config, backbone, t, s))
        n = min(stage.probe_pairs, len(train_rows.chosen))
        head = fit_linear_probe(
            features(train_rows.chosen[:n], train_rows.chosen_segments[:n]),
            features(train_rows.rejected[:n], train_rows.rejected_segments[:n]),
        )
    params = {"backbone": jax.tree.map(jnp.asarray, backbone), "head": head}

    optimizer = make_optimizer(optim)
    step_fn = make_train_step(pair_loss_terms(config, stage.center_coefficient), optimizer)
    checkpointer = Checkpointer(run_dir / "checkpoints")
    bar = tqdm(total=stage.steps, desc="reward")

    def on_metrics(step: int, metrics: dict[str, float], state) -> None:
        bar.n = step
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        bar.refresh()

    result = run_training(
        init_state(params, optimizer, stage.seed),
        step_fn,
        BatchIterator(train_rows, stage.batch_size, stage.seed),
        checkpointer,
        stage.steps,
        stage.save_every,
        on_metrics,
    )
    bar.close()
    checkpointer.close()
    params = result.state.params
    metrics: dict[str, Any] = dict(
        steps=int(result.state.step),
        interrupted=result.interrupted,
        **{f"data_{k}": v for k, v in dataclasses.asdict(stats).items()},
    )
    evaluated = {"train": train_rows} | ({"eval": build(stage.eval)[0]} if stage.eval else {})
    for name, rows in evaluated.items():
        chosen, rejected = score_pairs(config, params, rows, stage.batch_size)
        for key, value in preference_metrics(jnp.asarray(chosen), jnp.asarray(rejected)).items():
            metrics[f"{name}_{key}"] = float(value)
    out = run_dir / "reward_model"
    save_hf(config, jax.tree.map(np.asarray, params["backbone"]), out)
    save_file(
        {k: np.asarray(v, np.float32).reshape(-1) for k, v in params["head"].items()},
        str(out / "head.safetensors"),
    )
    metrics["checkpoint"] = str(out)
    return metrics
