"""Optimizers and learning-rate schedules (optax), built from a small validated config."""

from __future__ import annotations

import dataclasses

import optax

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adafactor")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer, schedule and clipping. Warmup is linear from 0 to `lr`."""

    name: str = "adamw"
    lr: float = 1e-4  # peak learning rate
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    schedule: str = "cosine"  # after warmup: cosine or linear decay to final_lr_fraction * lr
    warmup_steps: int = 0
    total_steps: int = 1000
    final_lr_fraction: float = 0.0
    clip_norm: float | None = 1.0  # global gradient-norm clipping; None disables it

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name={self.name!r}; expected one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r}; expected one of {SCHEDULES}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError("optim.warmup_steps must be in [0, optim.total_steps]")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"optim.clip_norm must be positive or null, got {self.clip_norm}")


def make_schedule(config: OptimConfig) -> optax.Schedule:
    """Learning rate as a function of the optimizer step."""
    final = config.lr * config.final_lr_fraction
    decay_steps = max(config.total_steps - config.warmup_steps, 1)
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(config.lr, decay_steps, alpha=config.final_lr_fraction)
    elif config.schedule == "linear":
        decay = optax.linear_schedule(config.lr, final, decay_steps)
    else:
        decay = optax.constant_schedule(config.lr)
    if not config.warmup_steps:
        return decay
    warmup = optax.linear_schedule(0.0, config.lr, config.warmup_steps)
    return optax.join_schedules([warmup, decay], [config.warmup_steps])


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    """Clipping (if any) followed by AdamW or Adafactor on the schedule."""
    schedule = make_schedule(config)
    if config.name == "adamw":
        core = optax.adamw(
            schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay
        )
    else:
        core = optax.adafactor(schedule, weight_decay_rate=config.weight_decay or None)
    if config.clip_norm is None:
        return core
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), core)
