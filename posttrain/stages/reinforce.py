"""The `reinforce` stage: REINFORCE with a KL penalty to a reference policy (algorithms.md §5).

Each step samples k responses to each of p prompts from the current policy (`posttrain.rl`'s
rollouts), scores them with any reward of the reward API, and descends

    R_i = r_i − β·sg(log π(y_i) − log π_ref(y_i)) [− c·|y_i|]          (KL in the reward)
    loss = −(1/(p·k)) Σ sg(R_i − b_i) · log π(y_i)                      (sequence log-probs)

with a baseline b by name: `rloo` (leave-one-out over a prompt's k samples, the default),
`moving_average` (carried in the train state), `none`, `mean` (biased by (k−1)/k) or
`group_normalized` (GRPO style: it rescales each prompt's rewards, which changes the objective).
`per_token_kl=true` credits each token with the KL penalties from it onward (reward-to-go):
same expected gradient, lower variance. The reference is the frozen SFT tree, or with
`reference=ema` an EMA of the policy (WARP's anchor, rate μ = `ema_rate`) carried in the state.

The estimator is on-policy for the model's own distribution: samples are drawn at temperature 1
without top-k/top-p, so the log-probs the loss differentiates are those of the policy that drew
them; `sampler_gap` (mean |sampler − trainer| token log-prob) is logged every step.

Writes: `checkpoints/`, `hf/` (the policy, with its tokenizer), `metrics.jsonl` (reward, KL k1
and k3, entropy estimate, length, sampler gap, time split), `metrics.png`, `reward_vs_kl.png`
(with the Best-of-N curve of the reference) and the summary.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig, OmegaConf

from posttrain.checkpoints import load_hf, save_hf
from posttrain.data.prompts import load_prompts
from posttrain.losses.kl import kl_k1, kl_k3, sequence_log_prob
from posttrain.losses.log_probs import sequence_token_log_probs
from posttrain.losses.policy_gradient import (
    BASELINES,
    compute_advantages,
    kl_reward_to_go,
    kl_shaped_reward,
    per_token_reinforce_loss,
    reinforce_loss,
)
from posttrain.models import ModelConfig, param_logical_axes
from posttrain.rewards.api import reward_from_config
from posttrain.rl.plots import best_of_n_curve, load_curve, plot_reward_vs_kl, save_curve
from posttrain.rl.rollouts import RolloutBatch, RolloutSource
from posttrain.sampling import SamplingConfig
from posttrain.sharding import activation_sharding, place_on_mesh, shard_batch, shard_params
from posttrain.stages.kit import TOKENIZER_FILE, StageContext, bundle_tokenizer, gather_to_host
from posttrain.stages.registry import register_stage
from posttrain.tokenizer import END_OF_TURN_ID, EOS_ID
from posttrain.train.optim import make_optimizer, make_schedule
from posttrain.train.step import ema_update, init_state, make_train_step

REFERENCES = ("sft", "ema")


@dataclasses.dataclass(frozen=True)
class ReinforceConfig:
    """The stage's settings; symbols as in algorithms.md §5."""

    init_checkpoint: str  # the SFT policy (HF directory): the start, and the `sft` reference
    prompts: str  # prompt set: .txt, .json/.jsonl/.parquet or a hub dataset
    reward: Any  # a rule name or a reward spec of posttrain.rewards.api
    tokenizer: str | None = None  # default: the checkpoint's own
    prompt_column: str = "prompt"
    split: str = "train"
    chat: bool = True
    steps: int = 100
    prompts_per_step: int = 8  # p
    samples_per_prompt: int = 4  # k (RLOO needs k >= 2)
    micro_batches: int = 1  # gradient accumulation over whole prompts
    beta: float = 0.05  # β of r − β·KL (TRL RLOO's default; WARP used 0.1)
    baseline: str = "rloo"
    baseline_decay: float = 0.9  # α of the moving-average baseline
    reference: str = "sft"  # sft (frozen) or ema (WARP's anchor)
    ema_rate: float = 0.01  # μ of the EMA reference (WARP: 0.01)
    per_token_kl: bool = False  # KL penalty per token with reward-to-go
    length_penalty: float = 0.0  # c of −c·|y| (WARP's appendix: 0.0005)
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    save_every: int = 50
    keep_checkpoints: int = 3
    sample_every: int = 25  # a wandb table of prompts, responses and rewards every N steps
    bon_pool: int = 8  # N reference samples per prompt for the Best-of-N curve (0: none)
    bon_prompts: int = 16
    chunk_size: int = 8192
    skip_nonfinite: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "samples_per_prompt", "micro_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"stage.{name} must be >= 1, got {getattr(self, name)}")
        if self.baseline not in BASELINES:
            raise ValueError(
                f"stage.baseline={self.baseline!r}; expected one of {sorted(BASELINES)}"
            )
        if self.baseline == "rloo" and self.samples_per_prompt < 2:
            raise ValueError("stage.baseline=rloo needs stage.samples_per_prompt >= 2")
        if self.reference not in REFERENCES:
            raise ValueError(f"stage.reference={self.reference!r}; expected one of {REFERENCES}")
        if self.prompts_per_step % self.micro_batches:
            raise ValueError(
                f"stage.micro_batches={self.micro_batches} must divide stage.prompts_per_step="
                f"{self.prompts_per_step} (a prompt's k samples stay in one micro-batch)"
            )
        if self.beta < 0 or not 0 < self.ema_rate <= 1 or not 0 <= self.baseline_decay < 1:
            raise ValueError("stage.beta >= 0, stage.ema_rate in (0, 1], baseline_decay in [0, 1)")
        if self.per_token_kl and self.baseline == "group_normalized":
            raise ValueError(
                "stage.per_token_kl needs a subtractive baseline, not group_normalized"
            )
        if self.temperature != 1.0 or self.top_k or self.top_p != 1.0:
            raise ValueError(
                "stage.temperature/top_k/top_p: REINFORCE here is on-policy for the model itself, "
                "so it samples at temperature 1 without truncation; with other settings the "
                "samples come from another policy than the one the loss differentiates"
            )


def reinforce_loss_terms(config: ModelConfig, stage: ReinforceConfig):
    """(params, rollouts, extras) -> (summed loss, rows, summed metrics) of REINFORCE + KL."""
    k = stage.samples_per_prompt

    def loss_terms(params, batch: RolloutBatch, extras):
        tokens, mask = batch.tokens, batch.response_mask
        policy_tok = sequence_token_log_probs(
            config, params, tokens[:, :-1], tokens[:, 1:], batch.segments[:, :-1], stage.chunk_size
        )
        policy_seq = sequence_log_prob(policy_tok, mask)
        reference_seq = sequence_log_prob(batch.reference_log_probs, mask)
        lengths = batch.lengths.astype(jnp.float32)
        shaped = kl_shaped_reward(
            batch.rewards, policy_seq, reference_seq, stage.beta, lengths, stage.length_penalty
        )
        options = {"decay": stage.baseline_decay} if stage.baseline == "moving_average" else {}
        advantages, _ = compute_advantages(
            shaped, stage.baseline, extras["baseline"], samples_per_prompt=k, **options
        )
        if stage.per_token_kl:
            # G_t = r − c·|y| − β·Σ_{t'≥t} (log π − log π_ref); the baseline is the one of G_0.
            base = batch.rewards - stage.length_penalty * lengths
            to_go = kl_reward_to_go(base, policy_tok, batch.reference_log_probs, mask, stage.beta)
            offset = (shaped - advantages.reshape(-1))[:, None]
            losses = per_token_reinforce_loss(policy_tok, mask, to_go - offset)
        else:
            losses = reinforce_loss(policy_tok, mask, advantages)
        frozen_tok = jax.lax.stop_gradient(policy_tok)
        tokens_per_row = jnp.maximum(jnp.sum(mask, axis=1), 1)
        gap = jnp.sum(jnp.abs(batch.sampler_log_probs - frozen_tok) * mask, axis=1)
        metrics = {
            "reward": jnp.sum(batch.rewards),
            "shaped_reward": jnp.sum(shaped),
            "kl_k1": jnp.sum(kl_k1(frozen_tok, batch.reference_log_probs, mask)),
            "kl_k3": jnp.sum(kl_k3(frozen_tok, batch.reference_log_probs, mask)),
            # Mean NLL of the sampled tokens: an estimate of the per-token entropy at T = 1.
            "entropy": jnp.sum(-jax.lax.stop_gradient(policy_seq) / tokens_per_row),
            "length": jnp.sum(lengths),
            "sampler_gap": jnp.sum(gap / tokens_per_row),
        }
        return jnp.sum(losses), jnp.float32(tokens.shape[0]), metrics

    return loss_terms


def update_extras_fn(stage: ReinforceConfig):
    """After the optimizer step: the EMA reference and the moving-average baseline."""

    def update(extras, params, aux, frozen):
        out = dict(extras)
        if stage.reference == "ema":
            out["anchor"] = ema_update(extras["anchor"], params, stage.ema_rate)
        if stage.baseline == "moving_average":
            decay = stage.baseline_decay
            out["baseline"] = decay * extras["baseline"] + (1 - decay) * aux["shaped_reward"]
        return out

    return update


def settings(node: DictConfig) -> ReinforceConfig:
    """ReinforceConfig from `cfg.stage` (the reward spec kept as plain data)."""
    from posttrain.stages.kit import settings_from_node

    return settings_from_node(ReinforceConfig, OmegaConf.to_container(node, resolve=True), "stage")


def reference_pool_curve(
    source: RolloutSource, params: Any, pool: int, prompts: int, seed: int
) -> dict[str, list[float]]:
    """The Best-of-N curve of the reference: `pool` samples for each of `prompts` prompts."""
    probe = RolloutSource(
        source.config,
        source.tokenizer,
        source.prompts[: max(prompts, 1)],
        source.reward,
        source.sampling,
        min(prompts, len(source.prompts)),
        pool,
        lambda state: state.params,
        seed=seed + 1,
        chunk_size=source.chunk_size,
    )
    probe.prompt_width = source.prompt_width
    batch = probe.next_batch(types.SimpleNamespace(params=params))
    return best_of_n_curve(batch.rewards.reshape(-1, pool))


@register_stage(
    "reinforce",
    groups=("stage", "optim", "logger"),
    trains=True,
    headline=("final_reward", "final_kl_k1", "initial_reward", "steps"),
)
def run(ctx: StageContext) -> dict[str, Any]:
    """Run REINFORCE with a KL penalty; returns its metrics."""
    stage = settings(ctx.cfg.stage)
    optim = ctx.optim()
    if ctx.cfg.dry_run:
        from posttrain.models import abstract_params
        from posttrain.train.memory import estimate_training_memory

        config = ctx.checkpoint_config(stage.init_checkpoint)
        rows = stage.prompts_per_step * stage.samples_per_prompt
        estimate = estimate_training_memory(
            config,
            make_optimizer(optim),
            rows,
            256 + stage.max_new_tokens,
            ctx.mesh,
            micro_batches=stage.micro_batches,
            chunk_size=stage.chunk_size,
            frozen=[("reference", abstract_params(config))],
            rollout_batch=rows,
            cache_size=256 + stage.max_new_tokens,
        )
        return ctx.dry_run_report(config, estimate)
    tokenizer = ctx.tokenizer(stage.tokenizer, stage.init_checkpoint)
    config, params = load_hf(stage.init_checkpoint)
    ctx.check_vocab(config, tokenizer, stage.init_checkpoint)
    reward = reward_from_config(stage.reward, str(tokenizer.model_file))
    prompts = load_prompts(stage.prompts, stage.prompt_column, stage.split)

    mesh = ctx.mesh
    params = shard_params(jax.tree.map(jnp.asarray, params), param_logical_axes(config), mesh)
    reference = jax.tree.map(jnp.copy, params)  # frozen: the training step donates `params`
    extras: dict[str, Any] = {"baseline": jnp.zeros((), jnp.float32)}
    if stage.reference == "ema":
        extras["anchor"] = jax.tree.map(jnp.copy, params)
    sampling = SamplingConfig(
        max_new_tokens=stage.max_new_tokens, temperature=1.0, stop_ids=(EOS_ID, END_OF_TURN_ID)
    )

    def reference_of(state):
        return state.extras["anchor"] if stage.reference == "ema" else reference

    source = RolloutSource(
        config,
        tokenizer,
        prompts,
        reward,
        sampling,
        stage.prompts_per_step,
        stage.samples_per_prompt,
        reference_of,
        seed=stage.seed,
        chat=stage.chat,
        chunk_size=stage.chunk_size,
    )
    curve_path = ctx.run_dir / "bon_curve.json"
    curve = load_curve(curve_path)
    if curve is None and stage.bon_pool > 1:
        curve = reference_pool_curve(
            source, reference, stage.bon_pool, stage.bon_prompts, stage.seed
        )
        if ctx.is_main:
            save_curve(curve_path, curve)

    optimizer = make_optimizer(optim)
    jitted = make_train_step(
        reinforce_loss_terms(config, stage),
        optimizer,
        stage.micro_batches,
        uses_extras=True,
        update_extras=update_extras_fn(stage),
    )

    def step_fn(state, batch):
        with activation_sharding(mesh):
            return jitted(state, shard_batch(batch, mesh))

    history: dict[str, float] = {}

    def on_step(step: int, metrics: dict[str, float], state) -> None:
        metrics.update({f"seconds_{k}": v for k, v in source.seconds.items()})
        metrics["seconds_update"] = metrics["seconds"] - sum(source.seconds.values())
        history.setdefault("initial_reward", metrics["reward"])
        history.update(final_reward=metrics["reward"], final_kl_k1=metrics["kl_k1"])
        if stage.sample_every and step % stage.sample_every == 0:
            rows = [
                [str(p), r, float(score)]
                for p, r, score in zip(
                    source.last_prompts[:8],
                    source.last_responses[:8],
                    np.asarray(source.last_rewards)[:8],
                    strict=False,
                )
            ]
            ctx.tracker.log_table("train/samples", ["prompt", "response", "reward"], rows, step)

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
    metrics: dict[str, Any] = dict(
        steps=int(result.state.step),
        steps_run=result.steps_run,
        interrupted=result.interrupted,
        resumed_from=result.resumed_from,
        skipped_nonfinite=result.skipped_nonfinite,
        **history,
    )
    if result.interrupted:
        return ctx.finish(metrics)
    host_params = gather_to_host(result.state.params)
    if ctx.is_main:
        save_hf(config, host_params, ctx.run_dir / "hf")
        bundle_tokenizer(ctx.run_dir / "hf", tokenizer.model_file)
        draw_reward_vs_kl(ctx, curve, metrics["steps"])
    metrics["checkpoint"] = str(ctx.run_dir / "hf")
    metrics["tokenizer"] = str(ctx.run_dir / "hf" / TOKENIZER_FILE)
    return ctx.finish(metrics)


def draw_reward_vs_kl(ctx: StageContext, curve: dict | None, step: int) -> Path | None:
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
