"""What every RL stage builds before its first step: the policy on the mesh, a frozen copy as
the reference, the reward, the prompts, the sampling settings, the memory estimate, and the
reference's Best-of-N curve (saved, so a resumed run reuses it)."""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import jax
import jax.numpy as jnp

from posttrain.checkpoints import load_hf
from posttrain.data.prompts import load_prompts
from posttrain.models import BackboneConfig, abstract_params, param_logical_axes
from posttrain.rewards.api import RewardFunction, reward_from_config
from posttrain.rl.plots import best_of_n_curve, load_curve, save_curve
from posttrain.rl.rollouts import RolloutSource
from posttrain.sampling import SamplingConfig
from posttrain.sharding import shard_params
from posttrain.tokenizer import END_OF_TURN_ID, EOS_ID, GemmaTokenizer

# A dry run has no prompts to measure: it assumes prompts of up to this many tokens.
DRY_RUN_PROMPT_TOKENS = 256


@dataclasses.dataclass
class PolicySetup:
    """The pieces an RL stage starts from."""

    tokenizer: GemmaTokenizer
    config: BackboneConfig
    params: Any  # the policy, on the mesh
    reference: Any  # a frozen copy (the training step donates `params`)
    reward: RewardFunction
    prompts: list[Any]
    sampling: SamplingConfig


def load_policy_setup(ctx: Any, stage: Any) -> PolicySetup:
    """Tokenizer (checked against the checkpoint's), policy, reference, reward and prompts of a
    stage with init_checkpoint / tokenizer / reward / prompts / max_new_tokens settings."""
    tokenizer = ctx.tokenizer(stage.tokenizer, stage.init_checkpoint)
    config, params = load_hf(stage.init_checkpoint)
    ctx.check_vocab(config, tokenizer, stage.init_checkpoint)
    reward = reward_from_config(stage.reward, str(tokenizer.model_file))
    prompts = load_prompts(stage.prompts, stage.prompt_column, stage.split)
    params = shard_params(jax.tree.map(jnp.asarray, params), param_logical_axes(config), ctx.mesh)
    # Temperature 1 without truncation: the samples come from the model the loss differentiates.
    sampling = SamplingConfig(
        max_new_tokens=stage.max_new_tokens, temperature=1.0, stop_ids=(EOS_ID, END_OF_TURN_ID)
    )
    reference = jax.tree.map(jnp.copy, params)
    return PolicySetup(tokenizer, config, params, reference, reward, prompts, sampling)


def rl_dry_run(
    ctx: Any, stage: Any, optim: Any, trained_rows: int, sampled_rows: int, frozen_trees: int
) -> dict[str, Any]:
    """The dry-run report of an RL stage: train state, `frozen_trees` extra copies of the
    policy (reference, anchor), activations of the trained rows and the rollouts' KV cache."""
    from posttrain.train.memory import estimate_training_memory
    from posttrain.train.optim import make_optimizer

    config = ctx.checkpoint_config(stage.init_checkpoint)
    names = ("reference", "anchor", "frozen")
    frozen = [(names[min(i, 2)], abstract_params(config)) for i in range(frozen_trees)]
    length = DRY_RUN_PROMPT_TOKENS + stage.max_new_tokens
    estimate = estimate_training_memory(
        config,
        make_optimizer(optim),
        trained_rows,
        length,
        ctx.mesh,
        micro_batches=getattr(stage, "micro_batches", 1),
        chunk_size=stage.chunk_size,
        frozen=frozen,
        rollout_batch=sampled_rows,
        cache_size=length,
    )
    return ctx.dry_run_report(config, estimate)


def reference_curve(ctx: Any, source: RolloutSource, reference: Any, stage: Any) -> dict | None:
    """The reference's Best-of-N curve from `stage.bon_pool` samples of each of
    `stage.bon_prompts` prompts (None when bon_pool < 2); saved in the run directory."""
    path = ctx.run_dir / "bon_curve.json"
    curve = load_curve(path)
    if curve is not None or stage.bon_pool < 2:
        return curve
    prompts = min(stage.bon_prompts, len(source.prompts))
    probe = RolloutSource(
        source.config,
        source.tokenizer,
        source.prompts[:prompts],
        source.reward,
        source.sampling,
        prompts,
        stage.bon_pool,
        lambda state: state.params,
        seed=stage.seed + 1,
        chunk_size=source.chunk_size,
    )
    # The run's compiled sampler and scorer shapes.
    probe.prompt_width, probe.row_width = source.prompt_width, source.row_width
    batch = probe.next_batch(types.SimpleNamespace(params=reference))
    curve = best_of_n_curve(batch.rewards.reshape(-1, stage.bon_pool))
    if ctx.is_main:
        save_curve(path, curve)
    return curve
