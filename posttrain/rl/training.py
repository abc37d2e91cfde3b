"""The part every RL stage ends with: train the policy on its rollouts, then export it and draw
reward against KL (with the reference's Best-of-N curve)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from posttrain.rl.plots import plot_reward_vs_kl
from posttrain.rl.progress import RLStepLog
from posttrain.sharding import activation_sharding, place_on_mesh, shard_batch
from posttrain.train.optim import OptimConfig, make_optimizer, make_schedule
from posttrain.train.step import init_state, make_train_step


def train_policy(
    ctx: Any,
    stage: Any,
    optim: OptimConfig,
    config: Any,
    params: Any,
    extras: dict[str, Any],
    source: Any,
    loss_terms: Callable,
    update_extras: Callable,
    curve: dict | None,
    headline: Sequence[str],
    micro_batches: int = 1,
    uses_extras: bool = False,
    carry: Callable[[Any, Any], Any] | None = None,
) -> dict[str, Any]:
    """Run the loop on the on-policy `source`; the stage's metrics (loop, first and last values
    of `headline`), with `hf/` exported and `reward_vs_kl.png` drawn unless interrupted.

    `carry(state, batch) -> state` runs before each step, outside the compiled step: what it
    adds to the state (host arrays, placed replicated) is checkpointed with it
    (`EpochRollouts.carry`: the batch its later passes reuse)."""
    mesh = ctx.mesh
    optimizer = make_optimizer(optim)
    jitted = make_train_step(
        loss_terms, optimizer, micro_batches, uses_extras=uses_extras, update_extras=update_extras
    )

    def step_fn(state, batch):
        if carry is not None:
            state = place_on_mesh(carry(state, batch), mesh)
        with activation_sharding(mesh):
            return jitted(state, shard_batch(batch, mesh))

    on_step = RLStepLog(ctx, source, stage.sample_every, headline)
    result = ctx.train(
        place_on_mesh(init_state(params, optimizer, ctx.cfg.seed, extras), mesh),
        step_fn,
        source,
        stage.steps,
        stage.save_every,
        keep=stage.keep_checkpoints,
        skip_nonfinite=stage.skip_nonfinite,
        schedule=make_schedule(optim),
        on_step=on_step,
    )
    metrics: dict[str, Any] = {**result.summary(), **on_step.history}
    if result.interrupted:
        return metrics
    metrics |= ctx.export_policy(config, result.state.params)
    if ctx.is_main:
        draw_reward_vs_kl(ctx, curve, metrics["steps"])
    return metrics


def draw_reward_vs_kl(ctx: Any, curve: dict | None, step: int) -> Path | None:
    """`reward_vs_kl.png` from the run's metrics.jsonl, logged to wandb."""
    from posttrain.reporting import read_metrics

    jsonl = ctx.run_dir / "metrics.jsonl"
    if not jsonl.exists():
        return None
    png = plot_reward_vs_kl(
        read_metrics(jsonl),
        ctx.run_dir / "reward_vs_kl.png",
        curve,
        title=f"{ctx.name}: reward vs KL",
    )
    ctx.tracker.log_image("reward_vs_kl", png, step)
    return png
