"""The `reward` stage: a Bradley-Terry reward model on preference pairs.

Starts from an SFT checkpoint (the backbone) and a head that is zero or fitted by a linear probe
on frozen features; trains both with -log σ(r⁺ - r⁻ - m) (+ optional centering). Writes the
reward model to `<run_dir>/reward_model/` (backbone as a Hugging Face directory, head as
`head.safetensors`) and reports pairwise accuracy, mean margin and reward mean/std on the
training and held-out pairs, overall and per pair type. The WARM stage reuses these pieces.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from posttrain.checkpoints import load_hf
from posttrain.data.preferences import PreferenceRows, PreferenceStats, build_preferences
from posttrain.data.prompts import load_rows
from posttrain.data.sft import BatchIterator
from posttrain.data.shared_prompt import SharedPromptPairs, share_prompts
from posttrain.losses.bradley_terry import bradley_terry_loss, preference_metrics
from posttrain.models import ModelConfig
from posttrain.rewards.reward_model import (
    fit_linear_probe,
    init_head,
    last_token_features,
    reward_scores,
    save_reward_model,
    shared_prompt_rewards,
)
from posttrain.tokenizer import GemmaTokenizer
from posttrain.tracking import Tracker
from posttrain.train.checkpointing import Checkpointer
from posttrain.train.loop import LoopResult, run_training
from posttrain.train.optim import OptimConfig, make_optimizer
from posttrain.train.step import init_state, make_train_step

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """The reward stage's settings."""

    init_checkpoint: str  # SFT checkpoint (Hugging Face directory): the backbone
    tokenizer: str
    train: str  # preference rows: prompt, chosen, rejected[, margin, label, preamble, pair_type]
    eval: str | None = None
    split: str = "train"
    preamble: str | None = None  # instruction to the reward model, prepended to the prompt
    max_length: int = 128
    skip_malformed: bool = False
    batch_size: int = 8  # pairs per step
    steps: int = 100
    save_every: int = 50
    center_coefficient: float = 0.0  # c of c·(r⁺ + r⁻)²
    dropout: float = 0.0  # on the head's input features, training only
    linear_probe: bool = True  # fit the head on frozen features before training
    probe_pairs: int = 256
    # Train on each pair's common prefix once: same rewards, fewer tokens.
    share_prompts: bool = True
    seed: int = 0


@dataclasses.dataclass
class PreferenceSplits:
    """Tokenized training pairs, their stats, and every split to report metrics on."""

    train: PreferenceRows
    stats: PreferenceStats
    evaluated: dict[str, tuple[PreferenceRows, list[str]]]  # name -> (rows, pair types)


def load_preference_splits(
    stage: RewardConfig, tokenizer: GemmaTokenizer, min_pairs: int
) -> PreferenceSplits:
    """Tokenize the training (and held-out) pairs named by the stage."""

    def build(source: str) -> tuple[PreferenceRows, PreferenceStats]:
        rows = load_rows(source, stage.split)
        return build_preferences(
            rows, tokenizer, stage.max_length, source, stage.preamble, stage.skip_malformed
        )

    train, stats = build(stage.train)
    if len(train.chosen) < min_pairs:
        raise ValueError(f"{stage.train}: {len(train.chosen)} pairs < batch size {min_pairs}")
    evaluated = {"train": (train, stats.pair_types)}
    if stage.eval:
        rows, eval_stats = build(stage.eval)
        evaluated["eval"] = (rows, eval_stats.pair_types)
    return PreferenceSplits(train, stats, evaluated)


def probe_head(config: ModelConfig, backbone: Params, rows: PreferenceRows, pairs: int) -> Params:
    """A head fitted by a linear probe on the frozen backbone's features of the first pairs."""
    features = _jitted_features(config)
    n = min(pairs, len(rows.chosen))
    return fit_linear_probe(
        features(backbone, rows.chosen[:n], rows.chosen_segments[:n]),
        features(backbone, rows.rejected[:n], rows.rejected_segments[:n]),
    )


@functools.cache
def _jitted_features(config: ModelConfig):
    # Backbones are arguments, not constants: every probe of one config shares a compilation.
    return jax.jit(lambda p, t, s: last_token_features(config, p, t, s))


def pair_loss_terms(config: ModelConfig, center_coefficient: float, dropout: float = 0.0):
    """(params, pair batch[, key]) -> (summed BT loss, number of pairs); a key iff dropout > 0."""

    def loss_terms(params, batch: PreferenceRows | SharedPromptPairs, key=None):
        if isinstance(batch, SharedPromptPairs):
            chosen, rejected = shared_prompt_rewards(config, params, batch, dropout, key)
        else:
            keys = (None, None) if key is None else tuple(jax.random.split(key))
            chosen = reward_scores(
                config, params, batch.chosen, batch.chosen_segments, dropout, keys[0]
            )
            rejected = reward_scores(
                config, params, batch.rejected, batch.rejected_segments, dropout, keys[1]
            )
        losses = bradley_terry_loss(chosen, rejected, batch.margin, batch.label, center_coefficient)
        return jnp.sum(losses), jnp.float32(losses.shape[0])

    return loss_terms


@functools.cache
def _reward_train_step(
    config: ModelConfig, optim: OptimConfig, center_coefficient: float, dropout: float
):
    # One compiled step per setting: WARM members and experiment arms that share one reuse it.
    optimizer = make_optimizer(optim)
    loss_terms = pair_loss_terms(config, center_coefficient, dropout)
    return optimizer, make_train_step(loss_terms, optimizer, needs_rng=dropout > 0.0)


def train_reward_model(
    config: ModelConfig,
    params: Params,
    rows: PreferenceRows,
    stage: RewardConfig,
    optim: OptimConfig,
    checkpoint_dir: Path,
    tracker: Tracker,
    description: str = "reward",
) -> LoopResult:
    """Bradley-Terry training of backbone and head; resumes from `checkpoint_dir`."""
    optimizer, step_fn = _reward_train_step(config, optim, stage.center_coefficient, stage.dropout)
    checkpointer = Checkpointer(checkpoint_dir)
    bar = tqdm(total=stage.steps, desc=description)

    def on_metrics(step: int, metrics: dict[str, float], state) -> None:
        bar.n = step
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        bar.refresh()
        tracker.log({f"{description}/{k}": v for k, v in metrics.items()}, step)

    try:
        return run_training(
            init_state(params, optimizer, stage.seed),
            step_fn,
            BatchIterator(
                share_prompts(rows) if stage.share_prompts else rows, stage.batch_size, stage.seed
            ),
            checkpointer,
            stage.steps,
            stage.save_every,
            on_metrics,
        )
    finally:
        bar.close()
        checkpointer.close()


@functools.cache
def _jitted_scores(config: ModelConfig):
    # One compiled scorer per model config: members, averages and soups reuse it.
    return jax.jit(lambda p, t, s: reward_scores(config, p, t, s))


def score_pairs(
    config: ModelConfig, params: Params, rows: PreferenceRows, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rewards of both sides of every pair."""
    score = _jitted_scores(config)
    chosen, rejected = [], []
    for start in range(0, len(rows.chosen), batch_size):
        part = slice(start, start + batch_size)
        chosen.append(score(params, rows.chosen[part], rows.chosen_segments[part]))
        rejected.append(score(params, rows.rejected[part], rows.rejected_segments[part]))
    return np.concatenate(chosen), np.concatenate(rejected)


def pair_metrics(
    chosen: np.ndarray, rejected: np.ndarray, pair_types: list[str], prefix: str
) -> dict[str, float]:
    """Accuracy, margin and reward statistics overall and, with several pair types, per type."""
    metrics = {
        f"{prefix}_{k}": float(v)
        for k, v in preference_metrics(jnp.asarray(chosen), jnp.asarray(rejected)).items()
    }
    types = np.asarray(pair_types)
    if len(set(pair_types)) > 1 or (pair_types and pair_types[0] != "pairs"):
        for pair_type in sorted(set(pair_types)):
            mask = types == pair_type
            for k, v in preference_metrics(
                jnp.asarray(chosen[mask]), jnp.asarray(rejected[mask])
            ).items():
                metrics[f"{prefix}_{pair_type}_{k}"] = float(v)
    return metrics


def evaluate_reward_model(
    config: ModelConfig, params: Params, splits: PreferenceSplits, batch_size: int
) -> dict[str, float]:
    """`pair_metrics` on every split."""
    metrics: dict[str, float] = {}
    for name, (rows, pair_types) in splits.evaluated.items():
        chosen, rejected = score_pairs(config, params, rows, batch_size)
        metrics |= pair_metrics(chosen, rejected, pair_types, name)
    return metrics


def stage_config(cfg: DictConfig, config_class: type) -> Any:
    """The stage's dataclass from `cfg.stage` (without its `name`)."""
    values = OmegaConf.to_container(cfg.stage, resolve=True)
    return config_class(**{k: v for k, v in values.items() if k != "name"})


def make_tracker(cfg: DictConfig) -> Tracker:
    """The stage's wandb run (offline by default) with the resolved config."""
    return Tracker(
        cfg.logger.mode,
        cfg.logger.project,
        cfg.run_dir,
        OmegaConf.to_container(cfg, resolve=True),
        group=cfg.logger.group,
        name=cfg.logger.name,
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train the reward model; returns its metrics."""
    stage = stage_config(cfg, RewardConfig)
    optim = OptimConfig(**{**OmegaConf.to_container(cfg.optim), "total_steps": stage.steps})
    run_dir = Path(cfg.run_dir)
    tokenizer = GemmaTokenizer(stage.tokenizer)
    config, backbone = load_hf(stage.init_checkpoint)
    splits = load_preference_splits(stage, tokenizer, stage.batch_size)
    head = init_head(config)
    if stage.linear_probe:
        head = probe_head(config, backbone, splits.train, stage.probe_pairs)
    params = {"backbone": jax.tree.map(jnp.asarray, backbone), "head": head}
    tracker = make_tracker(cfg)
    try:
        result = train_reward_model(
            config, params, splits.train, stage, optim, run_dir / "checkpoints", tracker
        )
        metrics: dict[str, Any] = dict(
            steps=int(result.state.step),
            interrupted=result.interrupted,
            **{f"data_{k}": v for k, v in splits.stats.counts().items()},
        )
        if result.interrupted:
            return metrics
        params = result.state.params
        metrics |= evaluate_reward_model(config, params, splits, stage.batch_size)
        tracker.log({f"eval/{k}": v for k, v in metrics.items()}, metrics["steps"])
        metrics["checkpoint"] = str(save_reward_model(config, params, run_dir / "reward_model"))
        return metrics
    finally:
        tracker.finish()
