"""The evaluate stage: language-error rate, accuracy and KL of a policy, on the Gemma chat
format of a sentencepiece model with Gemma's special ids."""

from __future__ import annotations

import json
import types

import jax
import numpy as np
import pytest

from posttrain.checkpoints import save_hf
from posttrain.cli import _compose, run_stage
from posttrain.data import language_fix
from posttrain.evaluation.language_error import wilson_interval
from posttrain.models import get_preset, init_params
from posttrain.sampling.prompting import encode_prompt
from posttrain.stages.evaluate import _Replies, summarise
from posttrain.stages.kit import bundle_tokenizer
from posttrain.tokenizer import (
    BOS_ID,
    END_OF_TURN_ID,
    START_OF_TURN_ID,
    GemmaTokenizer,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A tiny random Gemma 2 exported with a tokenizer trained on the language-fix data."""
    root = tmp_path_factory.mktemp("evaluate")
    sft = language_fix.sft_rows(300, seed=0)
    pairs = language_fix.preference_rows(100, seed=0)
    tokenizer = GemmaTokenizer(train_tokenizer(language_fix.corpus(sft, pairs), root / "tok", 800))
    config = get_preset("tiny_gemma2", vocab_size=tokenizer.vocab_size)
    save_hf(config, jax.tree.map(np.asarray, init_params(config, jax.random.key(0))), root / "hf")
    bundle_tokenizer(root / "hf", tokenizer.model_file)
    prompts = root / "eval_prompts.jsonl"
    rows = language_fix.evaluation_prompts(12, seed=5)
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return types.SimpleNamespace(root=root, tokenizer=tokenizer, prompts=prompts, rows=rows)


def test_prompts_use_the_gemma_chat_format(policy):
    ids = encode_prompt(policy.tokenizer, policy.rows[0]["prompt"], chat=True)
    assert ids[:2] == [BOS_ID, START_OF_TURN_ID]
    assert ids.count(START_OF_TURN_ID) == 2 and ids.count(END_OF_TURN_ID) == 1
    # The prompt ends by opening the model's turn: `<start_of_turn>model\n`.
    tail = policy.tokenizer.decode(ids[ids.index(END_OF_TURN_ID) + 1 :])
    assert tail.strip() == "<start_of_turn>model"


def test_evaluate_stage_numbers_agree_with_its_own_records(policy, tmp_path):
    run_dir = tmp_path / "eval"
    arguments = [
        "stage=evaluate", f"run_dir={run_dir}", "logger=disabled",
        f"stage.checkpoint={policy.root / 'hf'}", f"stage.prompts={policy.prompts}",
        f"stage.reference={policy.root / 'hf'}", "stage.samples=3", "stage.beam_width=2",
        "stage.max_new_tokens=8", "stage.batch_prompts=8", "stage.reward=language_match",
        "stage.label=random", "stage.languages=[ja,en,zh,ko]",
    ]  # fmt: skip
    metrics = run_stage(_compose(arguments), arguments)
    records = [json.loads(line) for line in (run_dir / "responses.jsonl").open(encoding="utf-8")]
    saved = json.loads((run_dir / "evaluation.json").read_text("utf-8"))
    assert saved["prompts"] == 12 and saved["label"] == "random"
    for decoding, per_prompt in (("greedy", 1), ("sampled", 3), ("beam", 1)):
        mine = [r for r in records if r["decoding"] == decoding]
        assert len(mine) == 12 * per_prompt  # the padded last batch is cut off
        verdicts = [r["language_error"] for r in mine if r["language_error"] is not None]
        assert saved[f"ler_{decoding}_n"] == len(verdicts)
        assert saved[f"undetermined_{decoding}"] == len(mine) - len(verdicts)
        errors = sum(verdicts)
        assert saved[f"ler_{decoding}_errors"] == errors
        if verdicts:
            assert saved[f"ler_{decoding}"] == pytest.approx(errors / len(verdicts))
            low, high = wilson_interval(errors, len(verdicts))
            assert (saved[f"ler_{decoding}_low"], saved[f"ler_{decoding}_high"]) == (low, high)
        correct = [r["correct"] for r in mine]
        assert saved[f"accuracy_{decoding}"] == pytest.approx(np.mean(correct))
        # Replies are text of the model's turn only: the stop token never leaks into them.
        assert all("<end_of_turn>" not in r["response"] for r in mine)
        assert saved[f"reward_{decoding}"] == pytest.approx(np.mean([r["reward"] for r in mine]))
    # The reference is the policy itself: KL(π‖π) = 0 up to float32 rounding, reply by reply.
    assert abs(saved["kl_sampled"]) < 1e-4
    assert max(abs(r["kl"]) for r in records if r["decoding"] == "sampled") < 1e-4
    assert metrics["ler_sampled"] == saved["ler_sampled"]
    assert (run_dir / "language_error.png").stat().st_size > 0
    assert "| sampled |" in (run_dir / "report.md").read_text("utf-8")


def test_summary_honours_explicit_requests_and_kinds():
    rows = [
        {
            "prompt": "Docker とは何ですか？",
            "allowed": ["ja"],
            "answers": ["コンテナ"],
            "kind": "a",
        },
        {"prompt": "Docker とは何ですか？英語で答えてください。", "kind": "b"},
    ]
    replies = _Replies(
        ["Docker はコンテナを動かすソフトウェアです。", "Docker is software.",
         "Docker はコンテナを動かすソフトウェアです。", "Docker is software that runs containers."],
        per_prompt=2,
    )  # fmt: skip
    prompts = [r["prompt"] for r in rows]
    metrics, records = summarise("sampled", replies, rows, prompts, None, ("ja", "en"))
    # Row 0 allows ja (given); row 1 asks for English (read from the prompt, no `allowed`).
    assert [r["language_error"] for r in records] == [False, True, True, False]
    assert metrics["ler_sampled"] == 0.5 and metrics["ler_sampled_by_kind"] == {"a": 0.5, "b": 0.5}
    # Accuracy counts only rows that carry answers.
    assert metrics["accuracy_sampled_n"] == 2 and metrics["accuracy_sampled"] == 0.5
