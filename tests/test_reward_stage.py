"""The reward stage: preference rows, malformed pairs named, language pairs learned."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from posttrain.checkpoints import save_hf
from posttrain.data.preferences import build_preferences, encode_for_reward
from posttrain.data.prompts import DataError
from posttrain.data.synthetic import bilingual_corpus, language_contrast_rows
from posttrain.models import get_preset, init_params
from posttrain.tokenizer import END_OF_TURN_ID, GemmaTokenizer, train_tokenizer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    tokenizer = GemmaTokenizer(train_tokenizer(bilingual_corpus(1500), root / "tok", 700))
    config = get_preset("tiny_gemma2", vocab_size=tokenizer.vocab_size)
    save_hf(config, init_params(config, jax.random.key(0)), root / "sft")
    for name, rows in (
        ("train", language_contrast_rows(300, 0)),
        ("eval", language_contrast_rows(100, 1)),
    ):
        (root / f"{name}.jsonl").write_text(
            "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
        )
    return root, tokenizer


def test_reward_input_ends_at_end_of_turn_and_carries_the_preamble(assets):
    _, tokenizer = assets
    plain = encode_for_reward(tokenizer, "こんにちは", "Hello", None)
    with_preamble = encode_for_reward(
        tokenizer, "こんにちは", "Hello", "Reply in the user's language."
    )
    assert plain[-1] == END_OF_TURN_ID and with_preamble[-1] == END_OF_TURN_ID
    assert len(with_preamble) > len(plain)
    assert "Reply in the user's language." in tokenizer.decode(with_preamble)


def test_malformed_pairs_are_named_or_skipped(assets):
    _, tokenizer = assets
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}]
    with pytest.raises(DataError, match=r"pairs.jsonl: row 1: 'rejected'"):
        build_preferences(rows, tokenizer, 64, "pairs.jsonl")
    pairs, stats = build_preferences(rows, tokenizer, 64, "pairs.jsonl", skip_malformed=True)
    assert stats.malformed_skipped == 1 and len(pairs.chosen) == 1
    with pytest.raises(DataError, match="label"):
        build_preferences([{**rows[0], "label": 1.5}], tokenizer, 64, "pairs.jsonl")
    pairs, _ = build_preferences([{**rows[0], "margin": 2.0}], tokenizer, 64, "p")
    assert float(pairs.margin[0]) == 2.0 and float(pairs.label[0]) == 1.0


@pytest.mark.slow
def test_reward_stage_learns_language_pairs(assets, tmp_path):
    root, _ = assets
    command = [
        sys.executable, "-m", "posttrain.cli", "stage=reward",
        f"stage.init_checkpoint={root / 'sft'}", f"stage.tokenizer={root / 'tok.model'}",
        f"stage.train={root / 'train.jsonl'}", f"stage.eval={root / 'eval.jsonl'}",
        "stage.steps=60", "optim.lr=1e-3", "logger=disabled", f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "XLA_FLAGS": ""}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["train_accuracy"] >= 0.95 and metrics["eval_accuracy"] >= 0.9
    assert (tmp_path / "reward_model" / "head.safetensors").exists()
    assert np.isfinite(metrics["eval_reward_std"])
