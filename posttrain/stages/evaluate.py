"""The `evaluate` stage: language-error rate, answer accuracy, KL to a reference and reward of
a policy on a prompt set, under greedy decoding, sampling (k per prompt) and beam search.

Prompt rows may carry `allowed` (reply languages that are not an error; default: the prompt's
language as identified) and `answers` (phrases a correct reply contains, in any language; rows
without them are left out of the accuracy). Languages are identified by the script rule and the
offline statistical identifier of `posttrain.evaluation.language_id` (algorithms.md 4.3).

Writes `evaluation.json` (every number with its 95% Wilson interval), `report.md`,
`responses.jsonl` (every reply with its language and verdicts, for audits) and
`language_error.png` (the error rate per decoding with its interval, logged to wandb).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from posttrain.checkpoints import load_hf
from posttrain.data.sources import read_rows
from posttrain.evaluation.language_error import (
    Rate,
    answer_correct,
    judge_languages,
    language_error_rate,
)
from posttrain.evaluation.language_id import allowed_languages, identify
from posttrain.losses.log_probs import sequence_token_log_probs
from posttrain.rewards.api import (
    decode_responses,
    last_user_text,
    reward_from_config,
    score_responses,
)
from posttrain.rl.rollouts import training_rows
from posttrain.sampling import beam_search
from posttrain.sampling.prompting import encode_prompt
from posttrain.sampling.sampler import bucket_length, generate, left_pad
from posttrain.stages.kit import StageContext
from posttrain.stages.registry import register_stage
from posttrain.tokenizer import END_OF_TURN_ID, EOS_ID

DECODINGS = ("greedy", "sampled", "beam")
STOP_IDS = (EOS_ID, END_OF_TURN_ID)


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """What to evaluate and how."""

    checkpoint: str  # the policy (Hugging Face directory)
    prompts: str  # rows with prompt[, allowed, answers]: .jsonl/.json/.parquet or a hub dataset
    reference: str | None = None  # policy the KL is measured to (usually the SFT checkpoint)
    reward: Any = None  # a rule name or reward spec (posttrain.rewards.api), scored on replies
    label: str | None = None  # the row's name in reports (default: the stage's name)
    tokenizer: str | None = None
    prompt_column: str = "prompt"
    split: str = "train"
    chat: bool = True
    decodings: tuple[str, ...] = DECODINGS
    languages: tuple[str, ...] | None = None  # the identifier's candidate labels (null: all)
    samples: int = 4  # k replies per prompt when sampling (temperature 1)
    beam_width: int = 4
    max_new_tokens: int = 32
    batch_prompts: int = 64
    max_prompts: int | None = None  # evaluate only the first N prompts
    chunk_size: int = 8192
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [d for d in self.decodings if d not in DECODINGS]
        if unknown or not self.decodings:
            raise ValueError(
                f"stage.decodings={list(self.decodings)}; expected some of {DECODINGS}"
            )
        for name in ("samples", "beam_width", "max_new_tokens", "batch_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"stage.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass
class _Replies:
    """One decoding's replies, prompt-major (k per prompt)."""

    texts: list[str]
    per_prompt: int
    kl: list[float] = dataclasses.field(default_factory=list)  # k1 per reply (sampled only)


def _prompt_rows(stage: EvaluateConfig) -> list[dict[str, Any]]:
    rows = list(read_rows(stage.prompts, stage.split)[0])
    if stage.max_prompts is not None:
        rows = rows[: stage.max_prompts]
    if not rows:
        raise ValueError(f"stage.prompts={stage.prompts} has no rows")
    for number, row in enumerate(rows):
        if stage.prompt_column not in row:
            raise KeyError(
                f"{stage.prompts}: row {number} (0-based) has no {stage.prompt_column!r} column "
                f"(has {sorted(row)}); set stage.prompt_column"
            )
    return rows


def _allowed(row: dict[str, Any], prompt: Any) -> list[str]:
    allowed = row.get("allowed")
    if allowed:
        return [allowed] if isinstance(allowed, str) else list(allowed)
    return sorted(allowed_languages(prompt))


def _decode(
    stage: EvaluateConfig,
    decoding: str,
    config,
    params,
    reference,
    tokenizer,
    encoded: list[list[int]],
    width: int,
) -> _Replies:
    """Replies of one decoding for every prompt, batch by batch, with KL for sampling."""
    per_prompt = stage.samples if decoding == "sampled" else 1
    replies = _Replies([], per_prompt)
    with tqdm(total=len(encoded), desc=f"evaluate {decoding}") as bar:
        for start in range(0, len(encoded), stage.batch_prompts):
            batch = encoded[start : start + stage.batch_prompts]
            # Pad the last batch to the full size: one compiled shape per decoding.
            padded = batch + [batch[-1]] * (stage.batch_prompts - len(batch))
            if decoding == "beam":
                beams = beam_search(
                    config,
                    params,
                    padded,
                    width=stage.beam_width,
                    max_new_tokens=stage.max_new_tokens,
                    alpha=0.0,
                    stop_ids=STOP_IDS,
                )
                tokens, lengths = np.asarray(beams.tokens[:, 0]), np.asarray(beams.lengths[:, 0])
            else:
                tokens_in, segments_in = left_pad(padded, width)
                key = jax.random.fold_in(jax.random.key(stage.seed), start)
                out = generate(
                    config,
                    params,
                    jnp.asarray(tokens_in),
                    jnp.asarray(segments_in),
                    key,
                    jnp.asarray(1.0 if decoding == "sampled" else 0.0, jnp.float32),
                    jnp.asarray(0, jnp.int32),
                    jnp.asarray(1.0, jnp.float32),
                    max_new_tokens=stage.max_new_tokens,
                    stop_ids=STOP_IDS,
                    samples_per_prompt=per_prompt,
                )
                tokens, lengths, model_log_probs = jax.device_get(
                    (out.tokens, out.lengths, out.model_log_probs)
                )
                if decoding == "sampled" and reference is not None:
                    kl = _kl(stage, config, reference, padded, per_prompt, tokens, lengths,
                             model_log_probs, width)  # fmt: skip
                    replies.kl += kl[: len(batch) * per_prompt]
            texts = decode_responses(tokenizer, tokens, lengths, STOP_IDS)
            replies.texts += texts[: len(batch) * per_prompt]
            bar.update(len(batch))
    return replies


def _kl(stage, config, reference, prompts, k, tokens, lengths, model_log_probs, width) -> list:
    """k1 = log π(y|x) − log π_ref(y|x) of each sampled reply (unbiased for KL(π‖π_ref))."""
    prompt_ids = [ids for ids in prompts for _ in range(k)]
    rows, segments, mask, sampled = training_rows(
        prompt_ids, tokens, lengths, model_log_probs, width + tokens.shape[1]
    )
    under_reference = sequence_token_log_probs(
        config,
        reference,
        jnp.asarray(rows[:, :-1]),
        jnp.asarray(rows[:, 1:]),
        jnp.asarray(segments[:, :-1]),
        stage.chunk_size,
    )
    reference_sum = np.where(mask, np.asarray(under_reference), 0.0).sum(-1)
    return list((sampled.sum(-1) - reference_sum).astype(float))


def summarise(
    decoding: str,
    replies: _Replies,
    rows: Sequence[dict[str, Any]],
    prompts: Sequence[Any],
    rewards: np.ndarray | None,
    languages: Sequence[str] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics of one decoding, one record per reply); `languages` limits the identifier."""
    k = replies.per_prompt
    allowed = [_allowed(rows[i // k], prompts[i // k]) for i in range(len(replies.texts))]
    judged = judge_languages(
        replies.texts, allowed, functools.partial(identify, languages=languages)
    )
    rate, undetermined = language_error_rate(judged)
    correct = [
        answer_correct(text, rows[i // k]["answers"]) if rows[i // k].get("answers") else None
        for i, text in enumerate(replies.texts)
    ]
    scored = [c for c in correct if c is not None]
    metrics: dict[str, Any] = rate.as_dict(f"ler_{decoding}")
    metrics[f"ler_{decoding}_errors"] = rate.count
    metrics[f"undetermined_{decoding}"] = undetermined
    if scored:
        metrics |= Rate.of(sum(scored), len(scored)).as_dict(f"accuracy_{decoding}")
    if replies.kl:
        metrics[f"kl_{decoding}"] = float(np.mean(replies.kl))
    if rewards is not None:
        metrics[f"reward_{decoding}"] = float(np.mean(rewards))
    by_kind: dict[str, list[bool]] = {}
    records = []
    for i, (text, verdict) in enumerate(zip(replies.texts, judged, strict=True)):
        row = rows[i // k]
        if verdict.error is not None and row.get("kind"):
            by_kind.setdefault(str(row["kind"]), []).append(verdict.error)
        records.append(
            dict(
                decoding=decoding,
                prompt=last_user_text(prompts[i // k]),
                response=text,
                allowed=allowed[i],
                language=verdict.language,
                language_error=verdict.error,
                correct=correct[i],
                kind=row.get("kind"),
                **({"kl": replies.kl[i]} if replies.kl else {}),
                **({"reward": float(rewards[i])} if rewards is not None else {}),
            )
        )
    if by_kind:
        metrics[f"ler_{decoding}_by_kind"] = {
            kind: float(np.mean(errors)) for kind, errors in sorted(by_kind.items())
        }
    return metrics, records


def plot_language_error(metrics: dict[str, Any], decodings: Sequence[str], path: Path, title: str):
    """Error rate per decoding with its 95% interval, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [metrics[f"ler_{d}"] * 100 for d in decodings]
    low = [values[i] - metrics[f"ler_{d}_low"] * 100 for i, d in enumerate(decodings)]
    high = [metrics[f"ler_{d}_high"] * 100 - values[i] for i, d in enumerate(decodings)]
    figure, axis = plt.subplots(figsize=(5, 3.2))
    axis.errorbar(decodings, values, yerr=[low, high], fmt="o", capsize=5)
    axis.set_ylabel("language-error rate (%)")
    axis.set_ylim(bottom=0)
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def report_markdown(label: str, metrics: dict[str, Any], decodings: Sequence[str]) -> str:
    """One table row per decoding: error rate with interval, accuracy, KL, reward."""
    lines = [
        f"# Evaluation: {label}",
        "",
        "| decoding | language-error rate [95% CI] | undetermined | accuracy | KL to ref | reward |",
        "|---|---|---|---|---|---|",
    ]
    for d in decodings:
        rate = Rate.of(metrics[f"ler_{d}_errors"], metrics[f"ler_{d}_n"])
        accuracy = metrics.get(f"accuracy_{d}")
        kl, reward = metrics.get(f"kl_{d}"), metrics.get(f"reward_{d}")
        lines.append(
            f"| {d} | {rate} | {metrics[f'undetermined_{d}']} | "
            f"{'—' if accuracy is None else f'{accuracy:.1%}'} | "
            f"{'—' if kl is None else f'{kl:.3f}'} | {'—' if reward is None else f'{reward:.3f}'} |"
        )
    return "\n".join(lines) + "\n"


def _evaluation_memory(ctx: StageContext, stage: EvaluateConfig) -> dict[str, Any]:
    from posttrain.models import abstract_params
    from posttrain.rl.setup import DRY_RUN_PROMPT_TOKENS
    from posttrain.train.memory import estimate_inference_memory

    config = ctx.checkpoint_config(stage.checkpoint)
    frozen = [("reference", abstract_params(config))] if stage.reference else []
    rows = stage.batch_prompts * max(stage.samples, stage.beam_width)
    estimate = estimate_inference_memory(
        config, rows, DRY_RUN_PROMPT_TOKENS + stage.max_new_tokens, ctx.mesh, frozen=frozen
    )
    return ctx.dry_run_report(config, estimate)


@register_stage("evaluate", headline=("ler_sampled", "ler_greedy", "ler_beam", "accuracy_greedy"))
def run(ctx: StageContext) -> dict[str, Any]:
    """Evaluate the policy; returns the metrics."""
    stage = ctx.settings(EvaluateConfig)
    if ctx.cfg.dry_run:
        return _evaluation_memory(ctx, stage)
    label = stage.label or ctx.name
    tokenizer = ctx.tokenizer(stage.tokenizer, stage.checkpoint)
    config, params = load_hf(stage.checkpoint)
    ctx.check_vocab(config, tokenizer, stage.checkpoint)
    reference = None
    if stage.reference is not None:
        reference_config, reference = load_hf(stage.reference)
        if reference_config != config:
            raise ValueError(
                f"stage.reference={stage.reference} is a different model from "
                f"stage.checkpoint={stage.checkpoint}; KL needs the same architecture"
            )
    reward_spec = stage.reward
    if isinstance(reward_spec, DictConfig):
        reward_spec = OmegaConf.to_container(reward_spec, resolve=True)
    reward = (
        None if reward_spec is None else reward_from_config(reward_spec, str(tokenizer.model_file))
    )
    rows = _prompt_rows(stage)
    prompts = [row[stage.prompt_column] for row in rows]
    encoded = [encode_prompt(tokenizer, prompt, stage.chat) for prompt in prompts]
    width = bucket_length(max(len(ids) for ids in encoded))

    metrics: dict[str, Any] = {"label": label, "prompts": len(rows)}
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    for decoding in stage.decodings:
        replies = _decode(stage, decoding, config, params, reference, tokenizer, encoded, width)
        k = replies.per_prompt
        rewards = None
        if reward is not None:
            rewards = score_responses(
                reward, [prompts[i // k] for i in range(len(replies.texts))], replies.texts
            )
        found, kept = summarise(decoding, replies, rows, prompts, rewards, stage.languages)
        metrics |= found
        records += kept
        rate = Rate.of(found[f"ler_{decoding}_errors"], found[f"ler_{decoding}_n"])
        print(f"[{ctx.name}] {decoding}: language errors {rate}", flush=True)
    metrics["seconds"] = time.perf_counter() - started
    # One line, no steps: the decodings are not a curve (the plot below draws them).
    ctx.metrics_log.write(0, {k: v for k, v in metrics.items() if isinstance(v, int | float)})

    out = ctx.run_dir
    report = report_markdown(label, metrics, stage.decodings)
    if ctx.is_main:
        from posttrain.reporting import write_atomically

        write_atomically(out / "evaluation.json", json.dumps(metrics, indent=2, ensure_ascii=False))
        write_atomically(
            out / "responses.jsonl",
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
        )
        write_atomically(out / "report.md", report)
        png = plot_language_error(
            metrics, stage.decodings, out / "language_error.png", f"{label}: language errors"
        )
        ctx.tracker.log_image("language_error", png, 0)
    return ctx.finish(metrics, tables={"language errors": report.split("\n", 2)[2]})
