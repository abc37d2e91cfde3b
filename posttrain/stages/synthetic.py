"""The `synthetic` stage: write a checkable task's train/eval/prompt files, preference pairs
and a tokenizer.

Tasks: `reversal` (reverse a digit string, asked in English or Japanese) and `language_fix`
(the flagship recipe's bilingual tasks, `posttrain.data.language_fix`: SFT rows biased toward
English replies to challenging Japanese prompts, plus `eval_prompts.jsonl`, and two preference
mixes, `pairs.jsonl` for the preamble reward model and `plain_pairs.jsonl` for a plain one).

Pipelines start here on a machine with nothing downloaded: the data are generated from
templates (English and Japanese), the tokenizer is trained on them with Gemma's special ids.
Outputs: `train.jsonl`, `eval.jsonl`, `prompts.jsonl` (the eval prompts), `pairs.jsonl` and
`eval_pairs.jsonl` (bilingual preference pairs by type, for the reward and WARM stages) and
`tokenizer.model`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from posttrain.data import language_fix
from posttrain.data.synthetic import bilingual_corpus, reversal_rows
from posttrain.data.synthetic_preferences import preference_corpus, preference_rows
from posttrain.reporting import plot_counts
from posttrain.stages.kit import StageContext
from posttrain.stages.registry import register_stage
from posttrain.tokenizer import train_tokenizer

TASKS = ("reversal", "language_fix")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """What to generate."""

    task: str = "reversal"
    train_rows: int = 4000
    eval_rows: int = 200
    preference_pairs: int = 400  # training pairs; held-out pairs are a quarter of this
    corpus_lines: int = 1000
    vocab_size: int = 700
    english_reply_rate: float = (
        0.3  # language_fix: SFT replies in English to challenging JA prompts
    )
    rl_prompts: int = 1000  # language_fix: the RL prompt set
    # language_fix: segment shares of the RL prompt set (default language_fix.RL_MIX), e.g.
    # {english: 0.05, japanese: 0.05, japanese_challenging: 0.8, override: 0.1}
    rl_prompt_mix: dict[str, float] | None = None
    eval_prompts: int = 256  # language_fix: challenging Japanese prompts for evaluation
    seed: int = 0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"stage.task={self.task!r}; expected one of {sorted(TASKS)}")
        for name in ("train_rows", "eval_rows", "corpus_lines", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"stage.{name} must be >= 1, got {getattr(self, name)}")
        if self.preference_pairs < 0:
            raise ValueError(f"stage.preference_pairs must be >= 0, got {self.preference_pairs}")
        if not 0.0 <= self.english_reply_rate <= 1.0:
            raise ValueError(
                f"stage.english_reply_rate must be in [0, 1], got {self.english_reply_rate}"
            )


def _write_jsonl(path: Path, rows: list[dict], write: bool = True) -> str:
    if not write:  # another process writes it
        return str(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", "utf-8")
    tmp.replace(path)
    return str(path)


@register_stage("synthetic", headline=("train_rows", "eval_rows", "preference_pairs"))
def run(ctx: StageContext) -> dict[str, Any]:
    """Generate the files; returns their paths as the stage's outputs."""
    stage = ctx.settings(SyntheticConfig)
    out = ctx.run_dir
    extra: dict[str, list[dict]] = {}
    if stage.task == "reversal":
        train = reversal_rows(stage.train_rows, seed=stage.seed)
        evaluation = reversal_rows(stage.eval_rows, seed=stage.seed + 1)
        prompts = [{"prompt": r["prompt"]} for r in evaluation]
        pairs = preference_rows(stage.preference_pairs, seed=stage.seed)
        held_out_pairs = preference_rows(max(stage.preference_pairs // 4, 1), seed=stage.seed + 1)
        corpus = bilingual_corpus(stage.corpus_lines, seed=stage.seed)
        corpus += [f"{r['prompt']}\n{r['response']}" for r in train[: stage.corpus_lines]]
        if stage.preference_pairs:
            corpus += preference_corpus(pairs)
    else:
        # Seeds apart per file so no file is a prefix of another's draw.
        train = language_fix.sft_rows(stage.train_rows, stage.seed, stage.english_reply_rate)
        evaluation = language_fix.sft_rows(
            stage.eval_rows, stage.seed + 1, stage.english_reply_rate
        )
        prompts = language_fix.prompt_rows(stage.rl_prompts, stage.seed + 2, stage.rl_prompt_mix)
        extra["eval_prompts"] = language_fix.evaluation_prompts(stage.eval_prompts, stage.seed + 3)
        pairs = language_fix.preference_rows(stage.preference_pairs, stage.seed + 4)
        held_out_pairs = language_fix.preference_rows(
            max(stage.preference_pairs // 4, 1), stage.seed + 5
        )
        extra["plain_pairs"] = language_fix.preference_rows(
            stage.preference_pairs, stage.seed + 6, mix=language_fix.PLAIN_PAIR_MIX
        )
        corpus = language_fix.corpus(train, pairs + extra["plain_pairs"])
    # Only process 0 writes; every process reports the same paths.
    write = ctx.is_main
    tokenizer = out / "tokenizer.model"
    if write:
        tokenizer = train_tokenizer(corpus, out / "tokenizer", stage.vocab_size)
    metrics: dict[str, Any] = dict(
        train=_write_jsonl(out / "train.jsonl", train, write),
        eval=_write_jsonl(out / "eval.jsonl", evaluation, write),
        prompts=_write_jsonl(out / "prompts.jsonl", prompts, write),
        tokenizer=str(tokenizer),
        train_rows=len(train),
        eval_rows=len(evaluation),
    )
    if stage.preference_pairs:
        metrics |= dict(
            pairs=_write_jsonl(out / "pairs.jsonl", pairs, write),
            eval_pairs=_write_jsonl(out / "eval_pairs.jsonl", held_out_pairs, write),
            preference_pairs=len(pairs),
        )
    for name, rows in extra.items():
        metrics[name] = _write_jsonl(out / f"{name}.jsonl", rows, write)
    # One line (no steps): what was generated, so every stage directory has the file; the plot
    # shows the counts instead of a curve.
    ctx.metrics_log.write(0, {k: v for k, v in metrics.items() if isinstance(v, int)})
    if write:
        types: dict[str, int] = {}
        for pair in pairs:
            types[pair["pair_type"]] = types.get(pair["pair_type"], 0) + 1
        rows = {"train": len(train), "eval": len(evaluation), "preference pairs": len(pairs)}
        plot_counts(
            {"rows per file": rows, "training pairs per type": types},
            out / "metrics.png",
            f"{ctx.name}: {stage.task} task and preference pairs",
        )
    return ctx.finish(metrics)
