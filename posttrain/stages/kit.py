"""The stage kit: what every stage is given, built once — settings, mesh, tracker, checks,
training with checkpoints, progress and per-step metrics, and the end-of-run files.

A stage's `run(ctx)` takes a `StageContext`. The order of a training stage:
1. `ctx.settings(Config)` — the stage's dataclass, every key checked where it is defined;
2. consistency checks before any work: `ctx.tokenizer(...)` (a checkpoint carries its own;
   a different one is refused), `ctx.check_vocab(...)`, `ctx.check_memory(...)`;
3. `ctx.train(...)` — Orbax checkpoints (resume, SIGTERM), a progress bar, `metrics.jsonl`,
   wandb; an interrupted run prints the command that resumes it;
4. `ctx.finish(metrics)` — `summary.md`/`summary.json`, the metrics plot, wandb closed.
Only process 0 writes files or talks to wandb.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
from omegaconf import DictConfig, OmegaConf

from posttrain.checkpoints.bundle import (
    TOKENIZER_FILE,
    TokenizerMismatchError,
    bundle_tokenizer,
    export_metadata,
    resolve_tokenizer,
)
from posttrain.stages.registry import StageSpec

__all__ = [
    "TOKENIZER_FILE",
    "StageContext",
    "TokenizerMismatchError",
    "VocabularyMismatchError",
    "bundle_tokenizer",
    "check_vocab",
    "export_metadata",
    "gather_to_host",
    "resolve_tokenizer",
    "settings_from_node",
]

_Settings = TypeVar("_Settings")


class VocabularyMismatchError(ValueError):
    """The tokenizer's vocabulary and the model's differ."""


def settings_from_node(cls: type[_Settings], node: DictConfig | dict, group: str) -> _Settings:
    """A stage's dataclass `cls` from its config node (lists stay lists; the group's `name` is
    its choice, not a field); an unknown key fails naming `group.key` and the closest field."""
    from posttrain.config_store import dataclass_from_node

    return dataclass_from_node(cls, node, group, lists_as_tuples=False, ignore=("name",))


def check_vocab(model_vocab: int, tokenizer_vocab: int, model: str, tokenizer: str) -> None:
    """Refuse a model whose vocabulary differs from the tokenizer's: larger, the sampler emits
    ids with no piece; smaller, some pieces have no embedding."""
    if model_vocab != tokenizer_vocab:
        raise VocabularyMismatchError(
            f"the model ({model}) has a vocabulary of {model_vocab} ids but the tokenizer "
            f"({tokenizer}) has {tokenizer_vocab} pieces; they must be equal"
        )


class StageContext:
    """Everything a stage is given; built by the command for one stage run."""

    def __init__(self, cfg: DictConfig, spec: StageSpec, resume_command: str | None = None):
        self.cfg = cfg
        self.spec = spec
        self.name = spec.name
        self.run_dir = Path(cfg.run_dir)
        self.is_main = jax.process_index() == 0
        self.resume_command = resume_command or f"posttrain resume={self.run_dir}"
        self._metrics_log = None
        self._tracker = None
        self._tokenizer_file: Path | None = None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def standalone(
        cls, run_dir: str | Path, name: str = "library", mesh: dict[str, int] | None = None
    ) -> StageContext:
        """A context outside the command (experiments, notebooks): wandb off, one device unless
        `mesh` gives the (data, fsdp, tensor) sizes."""
        from posttrain.stages.registry import StageSpec as Spec

        cfg = OmegaConf.create(
            {
                "run_dir": str(run_dir),
                "seed": 0,
                "dry_run": False,
                "force_memory": False,
                "coordinator": None,
                "mesh": mesh or {"data": 1, "fsdp": 1, "tensor": 1},
                "logger": {"mode": "disabled", "project": "posttrain", "group": None, "name": None},
                "stage": {"name": name},
            }
        )
        return cls(cfg, Spec(name, lambda ctx: {}, ("stage",), False, ()))

    # -- settings -------------------------------------------------------------------------
    def settings(self, cls: type[_Settings]) -> _Settings:
        """The stage's dataclass from `cfg.stage`, unknown keys named with a did-you-mean."""
        return settings_from_node(cls, self.cfg.stage, "stage")

    def optim(self, **changes: Any):
        """The OptimConfig of `cfg.optim` (its total_steps follows stage.steps unless set)."""
        from posttrain.config_store import optim_config_from_node

        values = OmegaConf.to_container(self.cfg.optim, resolve=True)
        return optim_config_from_node({**values, **changes})

    def model_config(self):
        """The ModelConfig of `cfg.model`, unknown fields named."""
        from posttrain.config_store import model_config_from_node

        return model_config_from_node(self.cfg.model)

    def record_model_vocab(self, vocab_size: int) -> None:
        """Make the logged and saved config show the vocabulary the model really has."""
        OmegaConf.update(self.cfg, "model.vocab_size", vocab_size, force_add=False)
        if self.is_main and (self.run_dir / "config.yaml").exists():
            from posttrain.reporting import save_resolved_config

            save_resolved_config(self.run_dir, self.cfg)

    # -- wiring ---------------------------------------------------------------------------
    @functools.cached_property
    def mesh(self):
        """The device mesh of `cfg.mesh` (joins a multi-host job when `coordinator` is set)."""
        from posttrain.sharding import MeshConfig, initialize_distributed, make_mesh

        initialize_distributed(self.cfg.get("coordinator"))
        config = MeshConfig(**OmegaConf.to_container(self.cfg.mesh))
        sizes = (config.data, config.fsdp, config.tensor)
        if -1 not in sizes and math.prod(sizes) < jax.device_count():
            # Fixed sizes name how many devices to use (mesh=single: one), not all of them.
            return make_mesh(config, jax.devices()[: math.prod(sizes)])
        return make_mesh(config)

    @property
    def tracker(self):
        """The stage's wandb run (offline by default); resumed runs continue the same one."""
        if self._tracker is None:
            from posttrain.tracking import Tracker

            logger = self.cfg.logger
            self._tracker = Tracker(
                logger.mode,
                logger.project,
                self.run_dir,
                OmegaConf.to_container(self.cfg, resolve=True),
                group=logger.group,
                name=logger.name,
            )
        return self._tracker

    @property
    def metrics_log(self):
        """The run's `metrics.jsonl` (one line per step)."""
        if self._metrics_log is None:
            from posttrain.reporting import MetricsLog

            self._metrics_log = MetricsLog(self.run_dir)
        return self._metrics_log

    # -- checks before any work -----------------------------------------------------------
    def tokenizer(self, given: str | None, checkpoint: str | Path | None = None):
        """The GemmaTokenizer to use (given, or bundled with the checkpoint; never both
        different)."""
        from posttrain.tokenizer import GemmaTokenizer

        tokenizer = GemmaTokenizer(resolve_tokenizer(given, checkpoint))
        self._tokenizer_file = tokenizer.model_file  # what exports carry
        return tokenizer

    def check_vocab(self, config, tokenizer, model: str) -> None:
        """The model's vocabulary must equal the tokenizer's."""
        check_vocab(config.vocab_size, tokenizer.vocab_size, model, str(tokenizer.model_file))

    def check_memory(self, estimate, what: str) -> None:
        """Refuse, before allocating, a run the estimate says will not fit (`force_memory`)."""
        from posttrain.train.memory import available_memory_bytes, check_fits

        # On CPU every simulated device shares the host's memory: divide it among those in use.
        available = available_memory_bytes(devices_in_use=self.mesh.devices.size)
        check_fits(estimate, available, what, bool(self.cfg.get("force_memory")))

    def dry_run_report(self, config, estimate) -> dict[str, Any]:
        """Parameter count and per-device memory from abstract shapes (printed); nothing is
        allocated."""
        from posttrain.models import abstract_params

        count = sum(math.prod(s.shape) for s in jax.tree.leaves(abstract_params(config)))
        print(f"[{self.name} dry run] {count / 1e6:.2f}M parameters\n{estimate.table()}")
        target = self.cfg.get("device_memory_gib")
        if target is not None and estimate.total > target * 2**30:
            from posttrain.train.memory import InsufficientMemoryError

            raise InsufficientMemoryError(
                f"{self.name}: {estimate.total / 2**30:.2f} GiB per device exceeds the target "
                f"device's {target} GiB (device_memory_gib); largest parts: "
                + ", ".join(f"{n} {b / 2**30:.2f} GiB" for n, b in estimate.largest())
            )
        return dict(
            parameters=count,
            devices=int(self.mesh.devices.size),
            memory_bytes_per_device=int(estimate.total),
            **{f"memory_{name}_bytes": int(size) for name, size in estimate.parts()},
        )

    def checkpoint_config(self, checkpoint: str | None):
        """The ModelConfig of a Hugging Face directory's config.json (no weights read), or of
        `cfg.model` when there is no such directory (a dry run without a checkpoint)."""
        import json

        from posttrain.checkpoints.huggingface import config_from_hf

        path = Path(checkpoint or "") / "config.json"
        if checkpoint and path.exists():
            return config_from_hf(json.loads(path.read_text()))
        return self.model_config()

    # -- training -------------------------------------------------------------------------
    def train(
        self,
        state,
        step_fn: Callable,
        batches,
        steps: int,
        save_every: int,
        *,
        checkpoint_dir: str | Path | None = None,
        keep: int = 3,
        skip_nonfinite: bool = False,
        schedule: Callable | None = None,
        desc: str | None = None,
        on_step: Callable[[int, dict[str, float], Any], None] | None = None,
        step_offset: int = 0,
        tags: dict[str, Any] | None = None,
    ):
        """`run_training` with checkpoints in `checkpoint_dir` (default run_dir/checkpoints),
        a progress bar, per-step metrics (loss, lr, grad_norm, tokens_per_second and the loss's
        own) in metrics.jsonl and wandb; `step_offset` places this loop's steps after earlier
        loops of the same stage (WARM's members); `tags` are added to every metrics line."""
        from tqdm import tqdm

        from posttrain.train.checkpointing import Checkpointer
        from posttrain.train.loop import run_training

        checkpointer = Checkpointer(Path(checkpoint_dir or self.run_dir / "checkpoints"), keep=keep)
        bar = tqdm(total=steps, desc=desc or self.name, disable=not self.is_main)
        prefix = f"{desc}/" if desc and desc != self.name else ""

        def on_metrics(step: int, metrics: dict[str, float], state) -> None:
            if schedule is not None:
                metrics["lr"] = float(schedule(step - 1))
            if "tokens" in metrics and metrics["seconds"] > 0:
                metrics["tokens_per_second"] = metrics["tokens"] / metrics["seconds"]
            if on_step is not None:
                on_step(step, metrics, state)
            scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
            self.metrics_log.write(step_offset + step, {**(tags or {}), **scalars})
            self.tracker.log(
                {f"train/{prefix}{k}": v for k, v in scalars.items()}, step_offset + step
            )
            bar.n = step
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            bar.refresh()

        try:
            result = run_training(
                state, step_fn, batches, checkpointer, steps, save_every, on_metrics, skip_nonfinite
            )
        finally:
            bar.close()
            checkpointer.close()
        if result.interrupted and self.is_main:
            print(
                f"[{self.name}] interrupted at step {int(result.state.step)}; checkpoint saved. "
                f"Resume with:\n    {self.resume_command}",
                flush=True,
            )
        return result

    def export_policy(self, config, params) -> dict[str, str]:
        """Write `hf/` (the policy as a Hugging Face directory, with the run's tokenizer; process
        0) and return its paths as the stage's `checkpoint` and `tokenizer` outputs."""
        from posttrain.checkpoints import save_hf

        if self._tokenizer_file is None:
            raise RuntimeError(
                "export_policy: the stage never resolved its tokenizer (ctx.tokenizer)"
            )
        directory = self.run_dir / "hf"
        host = gather_to_host(params)
        if self.is_main:
            save_hf(config, host, directory)
            bundle_tokenizer(directory, self._tokenizer_file)
        return {"checkpoint": str(directory), "tokenizer": str(directory / TOKENIZER_FILE)}

    # -- end of run -----------------------------------------------------------------------
    def finish(
        self,
        metrics: dict[str, Any],
        tables: dict[str, Any] | None = None,
        headline: tuple[str, ...] | None = None,
    ) -> dict[str, Any]:
        """Write the summary (printed too; `tables`: title -> markdown or (columns, rows)) and
        the metrics plot, log the plot, close wandb."""
        try:
            if self.is_main and not metrics.get("interrupted"):
                from posttrain.reporting import (
                    numeric_series,
                    plot_metrics,
                    read_metrics,
                    write_summary,
                )

                text = write_summary(
                    self.run_dir,
                    self.name,
                    metrics,
                    list(headline if headline is not None else self.spec.headline),
                    tables,
                )
                print(text, flush=True)
                jsonl = self.run_dir / "metrics.jsonl"
                # A stage with no steps (a data generator) has nothing to draw.
                if jsonl.exists() and numeric_series(read_metrics(jsonl)):
                    png = plot_metrics(jsonl, self.run_dir / "metrics.png")
                    self.tracker.log_image("metrics", png, int(metrics.get("steps", 0) or 0))
        finally:
            if self._tracker is not None:
                self._tracker.finish()
        return metrics


def gather_to_host(tree: Any) -> Any:
    """A tree of numpy arrays on every process (multi-host shards gathered first)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)
