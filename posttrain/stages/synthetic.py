"""The `synthetic` stage: write a checkable task's train/eval/prompt files and a tokenizer.

Pipelines start here on a machine with nothing downloaded: the data are generated from
templates (English and Japanese), the tokenizer is trained on them with Gemma's special ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from posttrain.data.synthetic import bilingual_corpus, reversal_rows
from posttrain.tokenizer import train_tokenizer

TASKS = {"reversal": reversal_rows}


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", "utf-8")
    tmp.replace(path)
    return str(path)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Generate the files; returns their paths as the stage's outputs."""
    stage = cfg.stage
    if stage.task not in TASKS:
        raise ValueError(f"stage.task={stage.task!r}; expected one of {sorted(TASKS)}")
    out = Path(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    make = TASKS[stage.task]
    train = make(stage.train_rows, seed=stage.seed)
    evaluation = make(stage.eval_rows, seed=stage.seed + 1)
    corpus = bilingual_corpus(stage.corpus_lines, seed=stage.seed)
    corpus += [f"{r['prompt']}\n{r['response']}" for r in train[: stage.corpus_lines]]
    tokenizer = train_tokenizer(corpus, out / "tokenizer", stage.vocab_size)
    return dict(
        train=_write_jsonl(out / "train.jsonl", train),
        eval=_write_jsonl(out / "eval.jsonl", evaluation),
        prompts=_write_jsonl(out / "prompts.jsonl", [{"prompt": r["prompt"]} for r in evaluation]),
        tokenizer=str(tokenizer),
        train_rows=len(train),
        eval_rows=len(evaluation),
    )
