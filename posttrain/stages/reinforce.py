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

`epochs=E > 1` makes E optimizer steps (each one trainer step) on every drawn batch, with the
clipped sequence ratio of TRL RLOO (algorithms.md §5.2) on every pass, the first included:

    ρ_i = π(y_i)/π_old(y_i),   loss = −(1/(p·k)) Σ min(ρ_i·A_i, clip(ρ_i, 1−ε, 1+ε)·A_i)

π_old is the policy that drew the batch (`EpochRollouts`), and the KL in the reward is π_old's,
so a batch's advantages are the same on all its passes (the moving-average baseline moves once
per batch, after its last pass, so that it never depends on the batch it baselines). On the
first pass π = π_old, ρ = 1 inside the band, and the gradient −A·∇ρ = −A·∇log π is plain
REINFORCE's; one loss for all passes means one compiled step. `clip_fraction` (rows whose
ratio left the band on the side their advantage pushes, so they have no gradient) and
`ratio_mean` are logged; reward, KL, entropy and sampler gap are then those of π_old's batch.

The estimator is on-policy for the model's own distribution: samples are drawn at temperature 1
without top-k/top-p, so the log-probs the loss differentiates are those of the policy that drew
them; `sampler_gap` (mean |sampler − trainer| token log-prob) is logged every step.

Writes: `checkpoints/`, `hf/` (the policy, with its tokenizer), `metrics.jsonl` (reward, KL k1
and k3, entropy estimate, length, sampler gap, time split), `metrics.png`, `reward_vs_kl.png`
(with the Best-of-N curve of the reference) and the summary.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from omegaconf import DictConfig, OmegaConf

from posttrain.losses.kl import kl_k1, kl_k3, sequence_log_prob
from posttrain.losses.log_probs import sequence_token_log_probs
from posttrain.losses.policy_gradient import (
    BASELINES,
    clipped_ratio_loss,
    compute_advantages,
    kl_reward_to_go,
    kl_shaped_reward,
    per_token_reinforce_loss,
    reinforce_loss,
)
from posttrain.models import BackboneConfig
from posttrain.rl.rollouts import EpochRollouts, RolloutBatch, RolloutSource
from posttrain.rl.setup import load_policy_setup, reference_curve, rl_dry_run
from posttrain.rl.training import train_policy
from posttrain.stages.kit import StageContext
from posttrain.stages.registry import register_stage
from posttrain.train.step import ema_update

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
    epochs: int = 1  # E optimizer steps per drawn batch (1: plain on-policy REINFORCE)
    clip_epsilon: float = 0.2  # ε of clip(ρ, 1−ε, 1+ε) when epochs > 1 (TRL RLOO's default)

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "samples_per_prompt", "micro_batches", "epochs"):
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
        if not self.clip_epsilon > 0:
            raise ValueError(f"stage.clip_epsilon must be > 0, got {self.clip_epsilon}")
        if self.epochs > 1 and self.per_token_kl:
            raise ValueError(
                "stage.per_token_kl needs stage.epochs=1: the clipped ratio of extra epochs is "
                "per sequence, and per-token credit would need a per-token ratio"
            )
        if self.temperature != 1.0 or self.top_k or self.top_p != 1.0:
            raise ValueError(
                "stage.temperature/top_k/top_p: REINFORCE here is on-policy for the model itself, "
                "so it samples at temperature 1 without truncation; with other settings the "
                "samples come from another policy than the one the loss differentiates"
            )


def reinforce_loss_terms(config: BackboneConfig, stage: ReinforceConfig):
    """(params, rollouts, extras) -> (summed loss, rows, summed metrics) of REINFORCE + KL."""
    k, replayed = stage.samples_per_prompt, stage.epochs > 1

    def loss_terms(params, batch: RolloutBatch, extras):
        tokens, mask = batch.tokens, batch.response_mask
        policy_tok = sequence_token_log_probs(
            config, params, tokens[:, :-1], tokens[:, 1:], batch.segments[:, :-1], stage.chunk_size
        )
        policy_seq = sequence_log_prob(policy_tok, mask)
        # The policy that drew the batch: the one trained (on-policy), or π_old with epochs.
        if replayed:
            drawn_tok = batch.behaviour_log_probs
            drawn_seq = sequence_log_prob(drawn_tok, mask)
        else:
            drawn_tok, drawn_seq = jax.lax.stop_gradient(policy_tok), policy_seq
        reference_seq = sequence_log_prob(batch.reference_log_probs, mask)
        lengths = batch.lengths.astype(jnp.float32)
        shaped = kl_shaped_reward(
            batch.rewards, drawn_seq, reference_seq, stage.beta, lengths, stage.length_penalty
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
        elif replayed:
            losses = clipped_ratio_loss(policy_tok, drawn_tok, mask, advantages, stage.clip_epsilon)
        else:
            losses = reinforce_loss(policy_tok, mask, advantages)
        tokens_per_row = jnp.maximum(jnp.sum(mask, axis=1), 1)
        gap = jnp.sum(jnp.abs(batch.sampler_log_probs - drawn_tok) * mask, axis=1)
        metrics = {
            "reward": jnp.sum(batch.rewards),
            "shaped_reward": jnp.sum(shaped),
            "kl_k1": jnp.sum(kl_k1(drawn_tok, batch.reference_log_probs, mask)),
            "kl_k3": jnp.sum(kl_k3(drawn_tok, batch.reference_log_probs, mask)),
            # Mean NLL of the sampled tokens: an estimate of the per-token entropy at T = 1.
            "entropy": jnp.sum(-jax.lax.stop_gradient(drawn_seq) / tokens_per_row),
            "length": jnp.sum(lengths),
            "sampler_gap": jnp.sum(gap / tokens_per_row),
        }
        if replayed:
            ratio = jnp.exp(jax.lax.stop_gradient(policy_seq) - drawn_seq)
            a = advantages.reshape(-1)
            eps = stage.clip_epsilon
            clipped = ((ratio > 1 + eps) & (a > 0)) | ((ratio < 1 - eps) & (a < 0))
            metrics["clip_fraction"] = jnp.sum(clipped.astype(jnp.float32))
            metrics["ratio_mean"] = jnp.sum(ratio)
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
            if stage.epochs > 1:  # once per batch, after its last pass (passes count from 0)
                last = extras["pass"] == stage.epochs - 1
                out["baseline"] = jnp.where(last, out["baseline"], extras["baseline"])
        return out

    return update


def settings(node: DictConfig) -> ReinforceConfig:
    """ReinforceConfig from `cfg.stage` (the reward spec kept as plain data)."""
    from posttrain.stages.kit import settings_from_node

    return settings_from_node(ReinforceConfig, OmegaConf.to_container(node, resolve=True), "stage")


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
        rows = stage.prompts_per_step * stage.samples_per_prompt
        return rl_dry_run(ctx, stage, optim, rows, rows, 1 + (stage.reference == "ema"))
    setup = load_policy_setup(ctx, stage)
    config, params, reference = setup.config, setup.params, setup.reference
    extras: dict[str, Any] = {"baseline": jnp.zeros((), jnp.float32)}
    if stage.reference == "ema":
        extras["anchor"] = jax.tree.map(jnp.copy, params)

    def reference_of(state):
        return state.extras["anchor"] if stage.reference == "ema" else reference

    source = RolloutSource(
        config,
        setup.tokenizer,
        setup.prompts,
        setup.reward,
        setup.sampling,
        stage.prompts_per_step,
        stage.samples_per_prompt,
        reference_of,
        seed=stage.seed,
        chat=stage.chat,
        chunk_size=stage.chunk_size,
    )
    curve = reference_curve(ctx, source, reference, stage)
    batches, carry = source, None
    if stage.epochs > 1:
        batches = EpochRollouts(source, stage.epochs)
        extras |= batches.initial_extras()
        carry = batches.carry

    metrics = train_policy(
        ctx, stage, optim, config, params, extras, batches, reinforce_loss_terms(config, stage),
        update_extras_fn(stage), curve, ("reward", "kl_k1"), stage.micro_batches,
        uses_extras=True, carry=carry,
    )  # fmt: skip
    return ctx.finish(metrics)
