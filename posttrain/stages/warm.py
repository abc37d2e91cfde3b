"""The `warm` stage: M Bradley-Terry reward models from one start, averaged weight by weight.

Every member starts from an SFT checkpoint (one shared, or several along one SFT run, WARM's
"Baklava") and one linear-probed head shared by all, or from one reward model trained first
for `trunk_steps` (the trunk); members differ by seed and data order (unless
`share_data_order`) and by a learning rate and dropout taken in turn from the config's lists.
The stage refuses members whose parameter trees or tokenizers differ, then writes the uniform
average (or a greedy soup) as `<run_dir>/reward_model/` and reports the trunk, each member, the
weight average and the prediction ensemble (mean of member rewards) side by side. The trunk and
the members are trained one after another, each in its own directory (`trunk/`,
`members/<i>/`), so an interrupted stage resumes at the one it was in.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig, OmegaConf

from posttrain.checkpoints import load_hf
from posttrain.models import BackboneConfig
from posttrain.rewards.reward_model import init_head, load_reward_model
from posttrain.rewards.warm import (
    IncompatibleMembersError,
    average_weights,
    check_compatible,
    ensemble,
    greedy_soup,
)
from posttrain.stages.kit import StageContext, resolve_tokenizer, settings_from_node
from posttrain.stages.registry import register_stage
from posttrain.stages.reward import (
    PreferenceSplits,
    RewardConfig,
    load_preference_splits,
    pair_metrics,
    probe_head,
    reward_memory,
    save_reward_export,
    score_pairs,
    train_reward_model,
)

AVERAGES = ("uniform", "greedy")


@dataclasses.dataclass(frozen=True)
class WarmConfig:
    """The warm stage's own settings, and the reward-stage settings every member shares.

    In the YAML both are flat under `stage.`: a key of RewardConfig (train, batch_size, steps,
    preamble, ...) goes to `reward`, WARM's own keys stay here; `reward.init_checkpoint`,
    `reward.dropout`, `reward.seed` and the learning rate are set per member.
    """

    init_checkpoints: list[str] | str  # SFT checkpoint(s); members take them in turn
    reward: RewardConfig
    members: int = 4
    learning_rates: list[float] = dataclasses.field(default_factory=lambda: [1e-5, 4e-5, 1e-4])
    dropouts: list[float] = dataclasses.field(default_factory=lambda: [0.05, 0.1])
    average: str = "uniform"  # or "greedy": members join best-first while eval accuracy holds
    # One data order for every member, so they differ by learning rate (and dropout) only:
    # members of a small model drift apart fast, and a shared order keeps them averageable.
    share_data_order: bool = False
    # Steps of one reward model trained first, that every member then starts from (0: none).
    # A shared trained start keeps members in one basin when the SFT start alone does not
    # (forks after early training are linearly connected: Frankle et al., 2020).
    trunk_steps: int = 0
    trunk_learning_rate: float | None = None  # default: learning_rates[0]

    def __post_init__(self) -> None:
        if self.members < 1:
            raise ValueError(f"stage.members must be >= 1, got {self.members}")
        if self.average not in AVERAGES:
            raise ValueError(f"stage.average={self.average!r}; expected one of {AVERAGES}")
        if self.average == "greedy" and not self.reward.eval:
            raise ValueError("stage.average=greedy ranks members on held-out pairs: set stage.eval")
        if not self.learning_rates or not self.dropouts:
            raise ValueError("stage.learning_rates and stage.dropouts need at least one value")
        if any(lr <= 0 for lr in self.learning_rates):
            raise ValueError(f"stage.learning_rates must be positive, got {self.learning_rates}")
        if self.trunk_learning_rate is not None and self.trunk_learning_rate <= 0:
            raise ValueError(
                f"stage.trunk_learning_rate must be positive, got {self.trunk_learning_rate}"
            )
        if self.trunk_steps < 0:
            raise ValueError(f"stage.trunk_steps must be >= 0, got {self.trunk_steps}")
        if self.trunk_steps and len(self.checkpoints) > 1:
            raise ValueError(
                "stage.trunk_steps trains one shared start from one checkpoint; "
                f"got {len(self.checkpoints)} init_checkpoints (Baklava): use one or the other"
            )

    @classmethod
    def from_node(cls, node: Any) -> WarmConfig:
        """From the flat `stage` node: RewardConfig keys to `reward`, the rest to WARM's own."""
        values = (
            OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
        )
        values = {k: v for k, v in dict(values).items() if k != "name"}
        own = {f.name for f in dataclasses.fields(cls)} - {"reward"}
        shared = {k: v for k, v in values.items() if k not in own}
        checkpoints = _as_list(values.get("init_checkpoints") or [""])
        shared["init_checkpoint"] = checkpoints[0]
        reward = settings_from_node(RewardConfig, shared, "stage")
        return cls(reward=reward, **{k: v for k, v in values.items() if k in own})

    @property
    def checkpoints(self) -> list[str]:
        """The SFT checkpoints as a list."""
        return _as_list(self.init_checkpoints)

    def member(self, index: int) -> tuple[RewardConfig, str]:
        """Member `index`'s reward-stage settings and starting checkpoint."""
        checkpoint = self.checkpoints[index % len(self.checkpoints)]
        member = dataclasses.replace(
            self.reward,
            init_checkpoint=checkpoint,
            dropout=self.dropouts[index % len(self.dropouts)],
            seed=self.reward.seed + (0 if self.share_data_order else index),
        )
        return member, checkpoint

    def learning_rate(self, index: int) -> float:
        """Member `index`'s peak learning rate."""
        return self.learning_rates[index % len(self.learning_rates)]


def _as_list(value: list[str] | str) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def check_tokenizers(paths: list[str]) -> None:
    """Refuse tokenizer files that differ (members must read the same token ids)."""
    digests = {path: hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in paths}
    first = paths[0]
    for path in paths[1:]:
        if digests[path] != digests[first]:
            raise IncompatibleMembersError(f"tokenizer {path} differs from {first}")


@register_stage(
    "warm",
    groups=("stage", "optim", "logger"),
    trains=True,
    headline=("warm_eval_accuracy", "ensemble_eval_accuracy", "warm_train_accuracy"),
)
def run(ctx: StageContext) -> dict[str, Any]:
    """Train the members, average them, report members / WARM / ensemble."""
    stage = WarmConfig.from_node(ctx.cfg.stage)
    run_dir = ctx.run_dir
    if ctx.cfg.dry_run:  # members train one after another: one member's memory
        config = ctx.checkpoint_config(stage.checkpoints[0])
        return ctx.dry_run_report(
            config, reward_memory(config, ctx.optim(), stage.reward, ctx.mesh)
        )
    given = stage.reward.tokenizer
    if isinstance(given, list):
        check_tokenizers(given)
        given = given[0]
    # Every start must carry (or be given) the same tokenizer.
    paths = [resolve_tokenizer(given, checkpoint) for checkpoint in stage.checkpoints]
    check_tokenizers(paths)
    tokenizer = ctx.tokenizer(paths[0])
    starts = {path: load_hf(path) for path in stage.checkpoints}
    config = starts[stage.checkpoints[0]][0]
    for path, (other, _) in starts.items():
        if other != config:
            raise IncompatibleMembersError(
                f"{path}: model config differs from {stage.checkpoints[0]}: {other} vs {config}"
            )
    ctx.check_vocab(config, tokenizer, stage.checkpoints[0])
    check_compatible([backbone for _, backbone in starts.values()], stage.checkpoints)
    ctx.check_memory(
        reward_memory(config, ctx.optim(), stage.reward, ctx.mesh), "this WARM member's training"
    )

    first, _ = stage.member(0)
    splits = load_preference_splits(first, tokenizer, first.batch_size)

    @functools.cache
    def shared_head() -> dict:
        # One head for every member (WARM's shared linear probe), fitted on the last checkpoint;
        # only when a member still needs training.
        if not stage.reward.linear_probe:
            return init_head(config)
        return probe_head(
            config, starts[stage.checkpoints[-1]][1], splits.train, stage.reward.probe_pairs
        )

    steps = stage.reward.steps
    metrics: dict[str, Any] = {f"data_{k}": v for k, v in splits.stats.counts().items()}

    def start_params(checkpoint: str) -> dict:
        return {
            "backbone": jax.tree.map(jnp.asarray, starts[checkpoint][1]),
            "head": jax.tree.map(jnp.array, shared_head()),  # a copy: training donates it
        }

    trunk = None
    if stage.trunk_steps:
        trunk_dir = run_dir / "trunk"
        if not (trunk_dir / "reward_model" / "member.json").exists():
            trunk_cfg = dataclasses.replace(
                stage.member(0)[0], steps=stage.trunk_steps, seed=stage.reward.seed
            )
            trunk_lr = stage.trunk_learning_rate or stage.learning_rate(0)  # None: the first
            optim = ctx.optim(lr=trunk_lr, total_steps=stage.trunk_steps)
            result = train_reward_model(
                ctx,
                config,
                start_params(stage.checkpoints[0]),
                splits.train,
                trunk_cfg,
                optim,
                trunk_dir / "checkpoints",
                description="trunk",
                tags={"member": "trunk"},
            )
            if result.interrupted:
                return ctx.finish(metrics | {"interrupted": True, "members_finished": 0})
            save_reward_export(
                ctx, config, result.state.params, trunk_dir / "reward_model", tokenizer, None
            )
            if ctx.is_main:
                info = dict(lr=optim.lr, steps=stage.trunk_steps, seed=trunk_cfg.seed)
                (trunk_dir / "reward_model" / "member.json").write_text(json.dumps(info, indent=2))
        trunk = load_reward_model(trunk_dir / "reward_model")[1]
        metrics["trunk"] = str(trunk_dir / "reward_model")
        metrics |= _split_metrics(config, trunk, splits, stage.reward.scoring_batch, "trunk")
    member_dirs, member_params = [], []
    for index in range(stage.members):
        member_cfg, checkpoint = stage.member(index)
        member_dir = run_dir / "members" / str(index)
        done = member_dir / "reward_model"
        if not (done / "member.json").exists():
            optim = ctx.optim(lr=stage.learning_rate(index))
            params = start_params(checkpoint) if trunk is None else jax.tree.map(jnp.array, trunk)
            result = train_reward_model(
                ctx,
                config,
                params,
                splits.train,
                member_cfg,
                optim,
                member_dir / "checkpoints",
                description=f"member{index}",
                # One step axis across trunk and members in metrics.jsonl.
                step_offset=stage.trunk_steps + index * steps,
                tags={"member": f"member{index}"},  # a label, not a plotted number
            )
            if result.interrupted:
                return ctx.finish(metrics | {"interrupted": True, "members_finished": index})
            save_reward_export(
                ctx, config, result.state.params, done, tokenizer, stage.reward.preamble
            )
            info = dict(
                checkpoint=checkpoint, lr=optim.lr, dropout=member_cfg.dropout, seed=member_cfg.seed
            )
            if ctx.is_main:
                (done / "member.json").write_text(json.dumps(info, indent=2))
        member_dirs.append(str(done))
        member_params.append(load_reward_model(done)[1])
    batch_size = stage.reward.scoring_batch
    compared, averaged = compare_members(config, member_params, splits, batch_size)
    metrics |= compared
    if stage.average == "greedy":
        rows, _ = splits.evaluated["eval"]  # selection data: its warm_eval is optimistic

        def eval_accuracy(params) -> float:
            chosen, rejected = score_pairs(config, params, rows, batch_size)
            return float(np.mean(chosen > rejected))

        averaged, kept = greedy_soup(member_params, eval_accuracy)
        metrics["soup_members"] = kept
        metrics |= _split_metrics(config, averaged, splits, batch_size, "warm")
    metrics["interrupted"] = False
    metrics["members"] = member_dirs
    # One member alone: the single reward model a recipe compares the average with.
    metrics["first_member"] = member_dirs[0]
    metrics["steps"] = steps
    total_steps = stage.trunk_steps + stage.members * steps
    ctx.tracker.log({k: v for k, v in metrics.items() if isinstance(v, float)}, total_steps)
    ctx.tracker.log_table("warm/comparison", *comparison_table(metrics, stage.members), total_steps)
    metrics["checkpoint"] = save_reward_export(
        ctx, config, averaged, run_dir / "reward_model", tokenizer, stage.reward.preamble
    )
    # The comparison of members, average and ensemble is the stage's summary.
    return ctx.finish(
        metrics, {"members, weight average and ensemble": format_comparison(metrics, stage.members)}
    )


def _split_metrics(
    config: BackboneConfig, params: Any, splits: PreferenceSplits, batch_size: int, name: str
) -> dict[str, float]:
    out = {}
    for split, (rows, types) in splits.evaluated.items():
        chosen, rejected = score_pairs(config, params, rows, batch_size)
        out |= pair_metrics(chosen, rejected, types, f"{name}_{split}")
    return out


def compare_members(
    config: BackboneConfig, member_params: list, splits: PreferenceSplits, batch_size: int
) -> tuple[dict[str, Any], Any]:
    """Metrics of every member, of their uniform weight average and of their ensemble; and
    that average."""
    metrics: dict[str, Any] = {}
    member_scores: dict[str, list] = {split: [] for split in splits.evaluated}
    for index, params in enumerate(member_params):
        for split, (rows, types) in splits.evaluated.items():
            chosen, rejected = score_pairs(config, params, rows, batch_size)
            member_scores[split].append((chosen, rejected))
            metrics |= pair_metrics(chosen, rejected, types, f"member{index}_{split}")
    for split, (_, types) in splits.evaluated.items():
        chosen = ensemble([c for c, _ in member_scores[split]])
        rejected = ensemble([r for _, r in member_scores[split]])
        metrics |= pair_metrics(chosen, rejected, types, f"ensemble_{split}")
    average = average_weights(member_params)
    metrics |= _split_metrics(config, average, splits, batch_size, "warm")
    return metrics, average


def comparison_table(metrics: dict[str, Any], members: int) -> tuple[list[str], list[list]]:
    """Columns and rows: the trunk (if any), each member, the weight average and the ensemble,
    per metric."""
    keys = sorted(
        {k.split("_", 1)[1] for k in metrics if k.startswith("warm_") and "accuracy" in k}
    )
    trunk = ["trunk"] if any(k.startswith("trunk_") for k in metrics) else []
    names = trunk + [f"member{i}" for i in range(members)] + ["warm", "ensemble"]
    rows = [[name] + [metrics.get(f"{name}_{key}") for key in keys] for name in names]
    return ["model", *keys], rows


def format_comparison(metrics: dict[str, Any], members: int) -> str:
    """The comparison table as Markdown."""
    columns, rows = comparison_table(metrics, members)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row[0]] + ["" if v is None else f"{v:.3f}" for v in row[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
