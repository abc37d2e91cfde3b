"""The `bond` stage: Best-of-N distillation, BOND and J-BOND (algorithms.md §7-8).

`variant=bond`: per prompt, N samples of the anchor (the frozen SFT policy, or with
`anchor_period` K > 0 the policy as it was after the last multiple of K steps: iterative BOND)
and c policy samples. The loss is the Jeffreys mix

    (1 − β)·(−log π(y_best))  +  β·(−sg(A)·log π(y)),    A = R − b,
    R = (N − 1)·log p̂_≤(y) − sg(log π(y) − log π_anchor(y)) + log N

with p̂_≤ the add-one quantile of y's reward among the N anchor samples (which are also the
pool y_best, the first of the best, is taken from), and b leave-one-out over a prompt's c samples
(or over the batch when c = 1).

`variant=jbond`: 1 policy sample (the paper's; `policy_samples` c > 1 averages c of them) and 2
anchor samples per prompt, the anchor an EMA of the policy (rate η); the reward −log 16 when a
policy sample is worse than both anchor samples (strict), return r_J − sg(log π − log π_anchor)
with a leave-one-out baseline (over the batch for one sample a prompt, over the prompt's c
samples otherwise), plus γ times the
policy-gradient form of KL(π‖π_anchor) — in the direction that pulls the policy toward the
anchor (§8.1: Algorithm 2's printed sign would push it away).

Samples are drawn at temperature 1 without truncation, so the log-probs the loss differentiates
are those of the policy that drew them. Logs reward (policy and anchor), log-quantile, win rate
against the anchor samples, KL to the SFT reference (k1, k3) and to the anchor, sampler gap and
the time split; draws `reward_vs_kl.png` with the reference's Best-of-N curve.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import OmegaConf

from posttrain.losses.bond import (
    batch_leave_one_out_baseline,
    bond_backward_return,
    bond_loss,
    jbond_loss,
    jbond_return,
    jbond_reward,
    log_quantile,
    should_replace_anchor,
)
from posttrain.losses.kl import kl_k1, kl_k3, sequence_log_prob
from posttrain.losses.log_probs import sequence_token_log_probs
from posttrain.losses.policy_gradient import leave_one_out_mean
from posttrain.models import BackboneConfig
from posttrain.rl.rollouts import RolloutSource
from posttrain.rl.setup import load_policy_setup, reference_curve, rl_dry_run
from posttrain.rl.training import train_policy
from posttrain.stages.kit import (
    StageContext,
    settings_from_node,
)
from posttrain.stages.registry import register_stage
from posttrain.train.step import ema_update

VARIANTS = ("bond", "jbond")


@dataclasses.dataclass(frozen=True)
class BondConfig:
    """The stage's settings; symbols as in algorithms.md §7-8."""

    init_checkpoint: str  # the SFT policy (HF directory): start, reference and first anchor
    prompts: str
    reward: Any  # a rule name or a reward spec of posttrain.rewards.api
    variant: str = "jbond"  # bond | jbond
    tokenizer: str | None = None
    prompt_column: str = "prompt"
    split: str = "train"
    chat: bool = True
    steps: int = 100
    prompts_per_step: int = 8  # p
    beta: float = 0.5  # Jeffreys weight β: 0 forward KL only, 1 backward only (paper: 0.5)
    n: int = 8  # BOND: N, the Best-of-N target and the anchor samples per prompt
    # c policy samples per prompt (c >= 2: leave-one-out per prompt); None: 2 for BOND, 1 for
    # J-BOND (the paper's Algorithm 2)
    policy_samples: int | None = None
    anchor_period: int = 0  # BOND: replace the anchor by the policy every K steps (0: never)
    ema_rate: float = 0.02  # J-BOND: η of the EMA anchor (paper: 0.02)
    gamma: float = 0.0  # J-BOND: γ of the extra KL toward the anchor (paper: 0 to 2)
    max_new_tokens: int = 32
    save_every: int = 50
    keep_checkpoints: int = 3
    sample_every: int = 25
    bon_pool: int = 8  # reference samples per prompt for the Best-of-N curve (0: none)
    bon_prompts: int = 16
    chunk_size: int = 8192
    skip_nonfinite: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"stage.variant={self.variant!r}; expected one of {VARIANTS}")
        for name in ("steps", "prompts_per_step", "policy_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"stage.{name} must be >= 1, got {value}")
        if self.n < 2:
            raise ValueError(
                f"stage.n must be >= 2 (Best-of-N of one sample is the anchor), got {self.n}"
            )
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"stage.beta (Jeffreys weight) must be in [0, 1], got {self.beta}")
        if not 0.0 <= self.ema_rate <= 1.0 or self.gamma < 0 or self.anchor_period < 0:
            raise ValueError("stage.ema_rate in [0, 1], stage.gamma >= 0, stage.anchor_period >= 0")

    @property
    def anchor_samples(self) -> int:
        """Anchor samples per prompt: N for BOND, 2 for J-BOND."""
        return self.n if self.variant == "bond" else 2

    @property
    def samples(self) -> int:
        """Policy samples per prompt c: `policy_samples`, by default 2 for BOND and 1 for J-BOND."""
        if self.policy_samples is not None:
            return self.policy_samples
        return 2 if self.variant == "bond" else 1


class BondBatch(NamedTuple):
    """Rows [p·c policy samples (prompt-major), then p best anchor samples, ...]."""

    tokens: np.ndarray
    segments: np.ndarray
    response_mask: np.ndarray
    sampler_log_probs: np.ndarray  # policy rows: the sampler's log-probs; best rows: 0
    lengths: np.ndarray
    policy_rewards: np.ndarray  # [p·c]
    anchor_rewards: np.ndarray  # [p, anchor samples]
    anchor_log_probs: np.ndarray  # [p·c, T-1] under the anchor, on the policy rows
    reference_log_probs: np.ndarray  # [p·c, T-1] under the SFT reference, on the policy rows


class BondSource(RolloutSource):
    """Policy samples from the current policy and anchor samples from the anchor, per prompt."""

    def __init__(self, *args: Any, anchor_samples: int, anchor, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.anchor_samples, self.anchor = anchor_samples, anchor

    def next_batch(self, state: Any) -> BondBatch:
        """One step's policy and anchor samples, rewarded, with the best anchor sample's row."""
        picked = self._next_prompts()
        self.seconds = {}
        started = time.perf_counter()
        key = self.next_key()
        anchor_params = self.anchor(state)
        anchors = self.draw(anchor_params, picked, self.anchor_samples, jax.random.fold_in(key, 1))
        policy = self.draw(state.params, picked, self.k, jax.random.fold_in(key, 0))
        self.seconds["generation"] = time.perf_counter() - started - self.seconds["scoring"]
        p, n = len(picked), self.anchor_samples
        anchor_rewards = anchors["rewards"].reshape(p, n)
        best = np.arange(p) * n + np.argmax(anchor_rewards, axis=1)  # first maximum on ties
        anchor_lp = self.token_log_probs(anchor_params, policy)
        reference_lp = self.token_log_probs(self.reference(state), policy)

        def both(name: str, zero_best: bool = False) -> np.ndarray:
            tail = anchors[name][best]
            return np.concatenate([policy[name], np.zeros_like(tail) if zero_best else tail])

        return BondBatch(
            tokens=both("tokens"),
            segments=both("segments"),
            response_mask=both("response_mask"),
            sampler_log_probs=both("sampler_log_probs", zero_best=True),
            lengths=both("lengths"),
            policy_rewards=policy["rewards"],
            anchor_rewards=anchor_rewards,
            anchor_log_probs=anchor_lp,
            reference_log_probs=reference_lp,
        )


def bond_loss_terms(config: BackboneConfig, stage: BondConfig):
    """(params, batch) -> (summed loss over prompts, prompts, summed metrics)."""
    c, n = stage.samples, stage.anchor_samples

    def loss_terms(params, batch: BondBatch):
        mask = batch.response_mask
        tok = sequence_token_log_probs(
            config,
            params,
            batch.tokens[:, :-1],
            batch.tokens[:, 1:],
            batch.segments[:, :-1],
            stage.chunk_size,
        )
        seq = sequence_log_prob(tok, mask)
        rows = batch.policy_rewards.shape[0]
        p = rows // c
        policy_seq, best_seq = seq[:rows].reshape(p, c), seq[rows:]
        policy_mask = mask[:rows]
        anchor_seq = sequence_log_prob(batch.anchor_log_probs, policy_mask).reshape(p, c)
        rewards = batch.policy_rewards.reshape(p, c)
        quantile = log_quantile(rewards, batch.anchor_rewards)

        def baseline(values):
            if c >= 2:
                return leave_one_out_mean(jax.lax.stop_gradient(values))
            return batch_leave_one_out_baseline(values)

        if stage.variant == "bond":
            returns = bond_backward_return(quantile, policy_seq, anchor_seq, n)
            losses = bond_loss(best_seq, policy_seq, returns - baseline(returns), stage.beta)
        else:
            reward_j = jbond_reward(rewards, batch.anchor_rewards)
            returns = jbond_return(reward_j, policy_seq, anchor_seq)
            log_ratio = jax.lax.stop_gradient(policy_seq - anchor_seq)
            losses = jbond_loss(
                best_seq, policy_seq, anchor_seq, reward_j,
                baseline(returns), baseline(log_ratio), stage.beta, stage.gamma,
            )  # fmt: skip
        frozen = jax.lax.stop_gradient(tok[:rows])
        per_row = jnp.maximum(jnp.sum(policy_mask, axis=1), 1)
        gap = jnp.sum(jnp.abs(batch.sampler_log_probs[:rows] - frozen) * policy_mask, axis=1)
        wins = jnp.mean((rewards[:, :, None] >= batch.anchor_rewards[:, None, :]), axis=(1, 2))
        # Metrics are summed over prompts here and divided by the number of prompts.
        metrics = {
            "reward": jnp.sum(jnp.mean(rewards, axis=1)),
            "anchor_reward": jnp.sum(jnp.mean(batch.anchor_rewards, axis=1)),
            "log_quantile": jnp.sum(jnp.mean(quantile, axis=1)),
            "win_rate_vs_anchor": jnp.sum(wins),
            "kl_k1": jnp.sum(
                kl_k1(frozen, batch.reference_log_probs, policy_mask).reshape(p, c).mean(1)
            ),
            "kl_k3": jnp.sum(
                kl_k3(frozen, batch.reference_log_probs, policy_mask).reshape(p, c).mean(1)
            ),
            "kl_to_anchor": jnp.sum(jax.lax.stop_gradient(policy_seq - anchor_seq).mean(1)),
            "sampler_gap": jnp.sum((gap / per_row).reshape(p, c).mean(1)),
            "length": jnp.sum(batch.lengths[:rows].reshape(p, c).mean(1).astype(jnp.float32)),
        }
        return jnp.sum(losses), jnp.float32(p), metrics

    return loss_terms


def update_extras_fn(stage: BondConfig):
    """The anchor after the optimizer step: an EMA (J-BOND), or a copy every K steps (BOND)."""

    def update(extras, params, aux, frozen):
        out = dict(extras, updates=extras["updates"] + 1)
        if stage.variant == "jbond":
            out["anchor"] = ema_update(extras["anchor"], params, stage.ema_rate)
        elif stage.anchor_period:
            replace = should_replace_anchor(extras["updates"], stage.anchor_period)
            out["anchor"] = jax.tree.map(
                lambda new, old: jnp.where(replace, new, old), params, extras["anchor"]
            )
        return out

    return update


def uses_anchor_tree(stage: BondConfig) -> bool:
    """Whether the anchor moves (and so lives in the train state) or is the frozen reference."""
    return stage.variant == "jbond" or stage.anchor_period > 0


@register_stage(
    "bond",
    groups=("stage", "optim", "logger"),
    trains=True,
    headline=("final_reward", "final_kl_k1", "final_win_rate_vs_anchor", "initial_reward", "steps"),
)
def run(ctx: StageContext) -> dict[str, Any]:
    """Run BOND or J-BOND; returns its metrics."""
    stage = settings_from_node(
        BondConfig, OmegaConf.to_container(ctx.cfg.stage, resolve=True), "stage"
    )
    optim = ctx.optim()
    if ctx.cfg.dry_run:
        trained = stage.prompts_per_step * (stage.samples + 1)
        sampled = stage.prompts_per_step * (stage.samples + stage.anchor_samples)
        return rl_dry_run(ctx, stage, optim, trained, sampled, 1 + uses_anchor_tree(stage))
    setup = load_policy_setup(ctx, stage)
    config, params, reference = setup.config, setup.params, setup.reference
    extras: dict[str, Any] = {"updates": jnp.zeros((), jnp.int32)}
    if uses_anchor_tree(stage):
        extras["anchor"] = jax.tree.map(jnp.copy, params)

    def anchor_of(state):
        return state.extras["anchor"] if uses_anchor_tree(stage) else reference

    source = BondSource(
        config, setup.tokenizer, setup.prompts, setup.reward, setup.sampling,
        stage.prompts_per_step, stage.samples,
        lambda state: reference, seed=stage.seed, chat=stage.chat, chunk_size=stage.chunk_size,
        anchor_samples=stage.anchor_samples, anchor=anchor_of,
    )  # fmt: skip
    curve = reference_curve(ctx, source, reference, stage)

    metrics = train_policy(
        ctx, stage, optim, config, params, extras, source, bond_loss_terms(config, stage),
        update_extras_fn(stage), curve, ("reward", "kl_k1", "win_rate_vs_anchor"),
    )  # fmt: skip
    return ctx.finish(metrics | {"variant": stage.variant})
