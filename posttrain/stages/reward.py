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
from jax.sharding import PartitionSpec

from posttrain.checkpoints import load_hf
from posttrain.data.preferences import PreferenceRows, PreferenceStats, build_preferences
from posttrain.data.prompts import read_rows
from posttrain.data.sft import BatchIterator
from posttrain.data.shared_prompt import PAIR_LAYOUTS, ForkedPairs, SharedPromptPairs
from posttrain.losses.bradley_terry import bradley_terry_loss, preference_metrics
from posttrain.models import backbone as backbones
from posttrain.models.backbone import BackboneConfig, param_logical_axes
from posttrain.rewards.api import LENGTH_BUCKET
from posttrain.rewards.reward_model import (
    fit_linear_probe,
    init_head,
    last_token_features,
    reward_scores,
    save_reward_model,
    shared_prompt_rewards,
)
from posttrain.sharding import activation_sharding, place_on_mesh, shard_batch, shard_params
from posttrain.stages.kit import StageContext, bundle_tokenizer, gather_to_host
from posttrain.stages.registry import register_stage
from posttrain.tokenizer import GemmaTokenizer
from posttrain.train.loop import LoopResult
from posttrain.train.optim import OptimConfig, make_optimizer, make_schedule
from posttrain.train.step import init_state, make_train_step

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """The reward stage's settings."""

    init_checkpoint: str  # SFT checkpoint (Hugging Face directory): the backbone
    train: str  # preference rows: prompt, chosen, rejected[, margin, label, preamble, pair_type]
    tokenizer: str | None = None  # default: the one the SFT checkpoint carries
    eval: str | None = None
    split: str = "train"
    columns: dict[str, str] | None = None  # file column -> ours (prompt, chosen, rejected, ...)
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
    # Train on each pair's common prefix once: same rewards, fewer tokens. Gemma masks the two
    # branches of one row; RecurrentGemma forks the prefix's state into both.
    share_prompts: bool = True
    # The train_* metrics score this many training pairs, spread evenly over the file (0: all):
    # scoring every pair of a large set several times costs more than the training.
    train_metric_pairs: int = 2048
    # Pairs per call when scoring for metrics (0: batch_size). Scoring is forward-only, so a
    # multiple of batch_size fits where training does and makes fewer, fuller calls.
    score_batch_size: int = 0
    seed: int = 0

    @property
    def scoring_batch(self) -> int:
        """Pairs per scoring call for metrics."""
        return self.score_batch_size or self.batch_size

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_length", "probe_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"stage.{name} must be >= 1, got {getattr(self, name)}")
        if self.save_every < 0:
            raise ValueError(f"stage.save_every must be >= 0, got {self.save_every}")
        if self.score_batch_size < 0 or self.score_batch_size % self.batch_size:
            raise ValueError(
                f"stage.score_batch_size must be 0 or a multiple of stage.batch_size "
                f"({self.batch_size}), got {self.score_batch_size}"
            )
        if self.train_metric_pairs < 0:
            raise ValueError(
                f"stage.train_metric_pairs must be >= 0, got {self.train_metric_pairs}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"stage.dropout must be in [0, 1), got {self.dropout}")
        if self.center_coefficient < 0:
            raise ValueError(
                f"stage.center_coefficient must be >= 0, got {self.center_coefficient}"
            )


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
        rows, unreadable = read_rows(
            source, stage.split, skip_malformed=stage.skip_malformed, columns=stage.columns
        )
        return build_preferences(
            rows,
            tokenizer,
            stage.max_length,
            source,
            stage.preamble,
            stage.skip_malformed,
            read_skipped=unreadable,
        )

    train, stats = build(stage.train)
    if len(train.chosen) < min_pairs:
        raise ValueError(f"{stage.train}: {len(train.chosen)} pairs < batch size {min_pairs}")
    evaluated = {"train": _metric_subset(train, stats.pair_types, stage.train_metric_pairs)}
    if stage.eval:
        rows, eval_stats = build(stage.eval)
        evaluated["eval"] = (rows, eval_stats.pair_types)
    return PreferenceSplits(train, stats, evaluated)


def _metric_subset(
    rows: PreferenceRows, pair_types: list[str], pairs: int
) -> tuple[PreferenceRows, list[str]]:
    """`pairs` rows spread evenly over `rows` (all of them when pairs is 0 or covers them)."""
    total = len(rows.chosen)
    if not pairs or pairs >= total:
        return rows, pair_types
    index = np.linspace(0, total - 1, pairs).round().astype(int)
    return PreferenceRows(*(np.asarray(a)[index] for a in rows)), [pair_types[i] for i in index]


def probe_head(
    config: BackboneConfig, backbone: Params, rows: PreferenceRows, pairs: int
) -> Params:
    """A head fitted by a linear probe on the frozen backbone's features of the first pairs."""
    features = _jitted_features(config)
    n = min(pairs, len(rows.chosen))
    return fit_linear_probe(
        features(backbone, rows.chosen[:n], rows.chosen_segments[:n]),
        features(backbone, rows.rejected[:n], rows.rejected_segments[:n]),
    )


@functools.cache
def _jitted_features(config: BackboneConfig):
    # Backbones are arguments, not constants: every probe of one config shares a compilation.
    return jax.jit(lambda p, t, s: last_token_features(config, p, t, s))


def pair_loss_terms(config: BackboneConfig, center_coefficient: float, dropout: float = 0.0):
    """(params, pair batch[, key]) -> (summed BT loss, number of pairs, sums of the training
    accuracy and margin, logged per step); a key iff dropout > 0."""

    def loss_terms(params, batch: PreferenceRows | SharedPromptPairs | ForkedPairs, key=None):
        if isinstance(batch, SharedPromptPairs | ForkedPairs):
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
        own = {
            "accuracy": jnp.sum((chosen > rejected).astype(jnp.float32)),
            "margin": jnp.sum(chosen - rejected),
        }
        return jnp.sum(losses), jnp.float32(losses.shape[0]), own

    return loss_terms


@functools.cache
def _reward_train_step(
    config: BackboneConfig, optim: OptimConfig, center_coefficient: float, dropout: float
):
    # One compiled step per setting: WARM members and experiment arms that share one reuse it.
    optimizer = make_optimizer(optim)
    loss_terms = pair_loss_terms(config, center_coefficient, dropout)
    return optimizer, make_train_step(loss_terms, optimizer, needs_rng=dropout > 0.0)


def reward_logical_axes(config: BackboneConfig) -> Params:
    """Logical axes of {'backbone', 'head'}: the head's weight lies along the model width."""
    return {
        "backbone": param_logical_axes(config),
        "head": {"w": PartitionSpec("embed"), "b": PartitionSpec()},
    }


def pair_layout(config: BackboneConfig, stage: RewardConfig) -> str | None:
    """The layout the family's shared-prompt pass reads (`PAIR_LAYOUTS`), or None: unshared."""
    return backbones.prompt_sharing(config) if stage.share_prompts else None


def train_reward_model(
    ctx: StageContext,
    config: BackboneConfig,
    params: Params,
    rows: PreferenceRows,
    stage: RewardConfig,
    optim: OptimConfig,
    checkpoint_dir: Path,
    description: str = "reward",
    step_offset: int = 0,
    tags: dict[str, Any] | None = None,
) -> LoopResult:
    """Bradley-Terry training of backbone and head on the stage's mesh; resumes from
    `checkpoint_dir`."""
    optimizer, jitted_step = _reward_train_step(
        config, optim, stage.center_coefficient, stage.dropout
    )
    mesh = ctx.mesh
    params = shard_params(params, reward_logical_axes(config), mesh)

    def step_fn(state, batch):
        with activation_sharding(mesh):
            return jitted_step(state, shard_batch(batch, mesh))

    layout = pair_layout(config, stage)
    pairs = PAIR_LAYOUTS[layout](rows) if layout else rows
    return ctx.train(
        place_on_mesh(init_state(params, optimizer, stage.seed), mesh),
        step_fn,
        BatchIterator(pairs, stage.batch_size, stage.seed),
        stage.steps,
        stage.save_every,
        checkpoint_dir=checkpoint_dir,
        schedule=make_schedule(optim),
        desc=description,
        step_offset=step_offset,
        tags=tags,
    )


@functools.cache
def _jitted_scores(config: BackboneConfig):
    # One compiled scorer per model config: members, averages and soups reuse it.
    return jax.jit(lambda p, t, s: reward_scores(config, p, t, s))


def score_pairs(
    config: BackboneConfig, params: Params, rows: PreferenceRows, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rewards of both sides of every pair."""
    score = _jitted_scores(config)
    chosen, rejected = [], []
    for start in range(0, len(rows.chosen), batch_size):
        part = slice(start, start + batch_size)
        chosen.append(score(params, *_trimmed(rows.chosen[part], rows.chosen_segments[part])))
        rejected.append(score(params, *_trimmed(rows.rejected[part], rows.rejected_segments[part])))
    return np.concatenate(chosen), np.concatenate(rejected)


def _trimmed(tokens: Any, segments: Any) -> tuple[Any, Any]:
    """Rows cut after their longest one's last token (rounded up to LENGTH_BUCKET): the
    padding after it is masked and causal, so the scores do not change, and a split padded to
    `max_length` is not scored at full width."""
    longest = int(np.max(np.sum(np.asarray(segments) > 0, axis=1), initial=1))
    width = min(-(-longest // LENGTH_BUCKET) * LENGTH_BUCKET, tokens.shape[1])
    return tokens[:, :width], segments[:, :width]


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
    config: BackboneConfig, params: Params, splits: PreferenceSplits, batch_size: int
) -> dict[str, float]:
    """`pair_metrics` on every split."""
    metrics: dict[str, float] = {}
    for name, (rows, pair_types) in splits.evaluated.items():
        chosen, rejected = score_pairs(config, params, rows, batch_size)
        metrics |= pair_metrics(chosen, rejected, pair_types, name)
    return metrics


def save_reward_export(
    ctx: StageContext, config: BackboneConfig, params: Params, directory: Path, tokenizer, preamble
) -> str:
    """Write the reward model with its tokenizer and preamble (process 0); returns its path."""
    host = gather_to_host(params)
    if ctx.is_main:
        save_reward_model(config, host, directory)
        bundle_tokenizer(directory, tokenizer.model_file, preamble=preamble)
    return str(directory)


@register_stage(
    "reward",
    groups=("stage", "optim", "logger"),
    trains=True,
    headline=("eval_accuracy", "train_accuracy", "eval_margin", "steps"),
)
def run(ctx: StageContext) -> dict[str, Any]:
    """Train the reward model; returns its metrics."""
    stage = ctx.settings(RewardConfig)
    optim = ctx.optim()
    if ctx.cfg.dry_run:
        config = ctx.checkpoint_config(stage.init_checkpoint)
        return ctx.dry_run_report(config, reward_memory(config, optim, stage, ctx.mesh))
    tokenizer = ctx.tokenizer(stage.tokenizer, stage.init_checkpoint)
    config, backbone = load_hf(stage.init_checkpoint)
    ctx.check_vocab(config, tokenizer, stage.init_checkpoint)
    ctx.check_memory(reward_memory(config, optim, stage, ctx.mesh), "this reward-model run")
    splits = load_preference_splits(stage, tokenizer, stage.batch_size)
    head = init_head(config)
    if stage.linear_probe:
        head = probe_head(config, backbone, splits.train, stage.probe_pairs)
    params = {"backbone": jax.tree.map(jnp.asarray, backbone), "head": head}
    result = train_reward_model(
        ctx, config, params, splits.train, stage, optim, ctx.run_dir / "checkpoints"
    )
    metrics: dict[str, Any] = dict(
        steps=int(result.state.step),
        interrupted=result.interrupted,
        # "branches" (Gemma), "fork" (RecurrentGemma) or "none": how a pair's prompt was run.
        prompt_sharing=pair_layout(config, stage) or "none",
        **{f"data_{k}": v for k, v in splits.stats.counts().items()},
    )
    if result.interrupted:
        return ctx.finish(metrics)
    params = result.state.params
    metrics |= evaluate_reward_model(config, params, splits, stage.scoring_batch)
    ctx.tracker.log({f"eval/{k}": v for k, v in metrics.items()}, metrics["steps"])
    metrics["checkpoint"] = save_reward_export(
        ctx, config, params, ctx.run_dir / "reward_model", tokenizer, stage.preamble
    )
    return ctx.finish(metrics)


def reward_memory(config: BackboneConfig, optim: OptimConfig, stage: RewardConfig, mesh):
    """Per-device memory of reward training: both sides of every pair are a row."""
    from posttrain.train.memory import estimate_training_memory

    return estimate_training_memory(
        config, make_optimizer(optim), 2 * stage.batch_size, stage.max_length, mesh
    )
