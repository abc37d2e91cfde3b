"""Optimizers and learning-rate schedules (optax), built from a small validated config."""

from __future__ import annotations

import dataclasses
import math

import optax

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adafactor")


# Per-optimizer defaults of the fields left None: AdamW's are optax's adamw defaults; Adafactor's
# are optax's adafactor defaults, which follow the paper (Shazeer & Stern 2018).
ADAMW_DEFAULTS = {"b1": 0.9, "b2": 0.999, "eps": 1e-8}
ADAFACTOR_DEFAULTS = {
    "eps": 1e-30,
    "decay_rate": 0.8,
    "momentum": None,
    "clipping_threshold": 1.0,
    "multiply_by_parameter_scale": True,
}
# Fields one optimizer has no use for, each with the other optimizer's nearest counterpart.
_ADAMW_ONLY = {"b1": "optim.momentum", "b2": "optim.decay_rate"}
_ADAFACTOR_ONLY = {
    "decay_rate": "optim.b2",
    "momentum": "optim.b1",
    "clipping_threshold": "optim.clip_norm (global, not per block)",
    "multiply_by_parameter_scale": None,
}


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizer, schedule and clipping. Warmup is linear from 0 to `lr`.

    A None optimizer field takes the chosen optimizer's default (ADAMW_DEFAULTS or
    ADAFACTOR_DEFAULTS) on construction; setting a field the chosen optimizer does not have
    (b1 for Adafactor, decay_rate for AdamW, ...) fails naming it, so no value is silently ignored.
    """

    name: str = "adamw"
    # Peak learning rate. Adafactor with multiply_by_parameter_scale: a relative step size
    # (the step is lr * max(1e-3, RMS(param)) per block), not an absolute one.
    lr: float = 1e-4
    # AdamW: decoupled decay scaled by the schedule (param -= lr_t * weight_decay * param).
    # Adafactor: optax's weight_decay_rate, not scaled by lr (param -= weight_decay * param).
    weight_decay: float = 0.0
    b1: float | None = None  # AdamW only: beta1 of the bias-corrected first moment (0.9)
    b2: float | None = None  # AdamW only: beta2 of the second moment (0.999)
    # Both, meaning differs: AdamW's epsilon added to sqrt(v_hat) (1e-8); Adafactor's epsilon1
    # added to the squared gradient before its factored moments (1e-30).
    eps: float | None = None
    # Adafactor only: c in the second-moment decay beta2_t = 1 - t**-c (0.8); b2's counterpart.
    decay_rate: float | None = None
    # Adafactor only: beta1 of an optional first moment, not bias-corrected; None keeps none
    # (the memory-saving default). b1's counterpart.
    momentum: float | None = None
    # Adafactor only: d, the update is clipped to RMS <= d per parameter block (1.0); inf turns
    # the clipping off (None already means "Adafactor's default").
    clipping_threshold: float | None = None
    # Adafactor only: scale each block's step by its parameter RMS (True: the paper's relative step).
    multiply_by_parameter_scale: bool | None = None
    schedule: str = "cosine"  # after warmup: cosine or linear decay to final_lr_fraction * lr
    warmup_steps: int = 0
    total_steps: int = 1000  # the schedule's horizon; the YAMLs default it to stage.steps
    final_lr_fraction: float = 0.0
    clip_norm: float | None = 1.0  # global gradient-norm clipping; None disables it

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name={self.name!r}; expected one of {OPTIMIZERS}")
        self._apply_optimizer_defaults()
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r}; expected one of {SCHEDULES}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if self.total_steps < 1:
            raise ValueError(
                f"optim.total_steps must be >= 1 (it follows stage.steps), got {self.total_steps}"
            )
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"optim.warmup_steps must be in [0, optim.total_steps={self.total_steps}], "
                f"got {self.warmup_steps}"
            )
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"optim.clip_norm must be positive or null, got {self.clip_norm}")
        for name in ("b1", "b2", "momentum"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"optim.{name} must be in [0, 1), got {value}")
        if self.decay_rate is not None and not 0 < self.decay_rate <= 1:
            raise ValueError(f"optim.decay_rate must be in (0, 1], got {self.decay_rate}")
        if self.eps < 0:
            raise ValueError(f"optim.eps must be >= 0, got {self.eps}")
        if self.clipping_threshold is not None and not self.clipping_threshold > 0:
            raise ValueError(
                f"optim.clipping_threshold must be positive (inf: off), got {self.clipping_threshold}"
            )

    def _apply_optimizer_defaults(self) -> None:
        """Reject the other optimizer's fields, then fill this one's unset fields."""
        adamw = self.name == "adamw"
        foreign, defaults = (
            (_ADAFACTOR_ONLY, ADAMW_DEFAULTS) if adamw else (_ADAMW_ONLY, ADAFACTOR_DEFAULTS)
        )
        for name, counterpart in foreign.items():
            if getattr(self, name) is not None:
                hint = f" (the nearest {self.name} setting: {counterpart})" if counterpart else ""
                raise ValueError(
                    f"optim.{name} is not a setting of optim.name={self.name}; remove it{hint}"
                )
        for name, default in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)  # frozen: set once, on construction


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
        threshold = config.clipping_threshold
        core = optax.adafactor(
            schedule,
            decay_rate=config.decay_rate,
            multiply_by_parameter_scale=config.multiply_by_parameter_scale,
            clipping_threshold=None if math.isinf(threshold) else threshold,
            momentum=config.momentum,
            weight_decay_rate=config.weight_decay or None,
            eps=config.eps,
        )
    if config.clip_norm is None:
        return core
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), core)
