"""The reward stage: preference rows (flat or chat, typed, preambles), malformed pairs named,
per-type metrics, reward-model files, language pairs learned."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from posttrain.checkpoints import load_hf, save_hf
from posttrain.data.preferences import build_preferences, encode_for_reward
from posttrain.data.prompts import DataError
from posttrain.data.synthetic import bilingual_corpus
from posttrain.data.synthetic_preferences import DEFAULT_MIX, PAIR_TYPES, preference_rows
from posttrain.models import get_preset, init_params
from posttrain.rewards.reward_model import load_reward_model, reward_scores, save_reward_model
from posttrain.stages.reward import pair_metrics
from posttrain.tokenizer import END_OF_TURN_ID, GemmaTokenizer, train_tokenizer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    tokenizer = GemmaTokenizer(train_tokenizer(bilingual_corpus(1500), root / "tok", 700))
    config = get_preset("tiny_gemma2", vocab_size=tokenizer.vocab_size)
    save_hf(config, init_params(config, jax.random.key(0)), root / "sft")
    for name, rows in (
        ("train", preference_rows(300, 0, {"language": 1.0})),
        ("eval", preference_rows(100, 1, {"language": 1.0})),
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
    with pytest.raises(DataError, match=r"pairs\.jsonl row 1 \(0-based\): 'rejected'"):
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


def _script(text: str) -> str:
    return "ja" if any("\u3040" <= c <= "\u30ff" for c in text) else "en"


def test_synthetic_pairs_by_type():
    rows = preference_rows(2000, seed=3)
    counts = {t: sum(r["pair_type"] == t for r in rows) for t in PAIR_TYPES}
    for pair_type, fraction in DEFAULT_MIX.items():
        assert abs(counts[pair_type] / len(rows) - fraction) < 0.03, (pair_type, counts)
    for row in rows:
        prompt_language = _script(row["prompt"].replace("英語で答えてください。", ""))
        chosen, rejected = _script(row["chosen"]), _script(row["rejected"])
        if row["pair_type"] == "language":
            assert chosen == prompt_language != rejected, row
        elif row["pair_type"] == "override":
            assert chosen != prompt_language == rejected, row
        else:
            assert chosen == rejected == prompt_language and row["chosen"] != row["rejected"]
        assert ("preamble" in row) == (row["pair_type"] == "consistency")
    assert preference_rows(50, seed=3) == preference_rows(50, seed=3)
    english = preference_rows(1000, seed=1, mix={"ordinary": 1.0}, english_fraction=0.95)
    assert sum(_script(r["prompt"]) == "en" for r in english) > 900
    with pytest.raises(ValueError, match="unknown pair types"):
        preference_rows(5, mix={"langauge": 1.0})


def test_chat_message_rows_and_row_preambles(assets):
    _, tokenizer = assets
    flat = {"prompt": "こんにちは", "chosen": "はい", "rejected": "Yes"}
    chat = {
        "chosen": [{"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "はい"}],
        "rejected": [{"role": "user", "content": "こんにちは"}, {"role": "assistant", "content": "Yes"}],
    }  # fmt: skip
    a, _ = build_preferences([flat], tokenizer, 64, "p")
    b, _ = build_preferences([chat], tokenizer, 64, "p")
    np.testing.assert_array_equal(a.chosen, b.chosen)
    np.testing.assert_array_equal(a.rejected, b.rejected)
    bad = {**chat, "rejected": [{"role": "user", "content": "別"}, *chat["rejected"][1:]]}
    with pytest.raises(DataError, match=r"p row 0 \(0-based\): 'chosen' and 'rejected' differ"):
        build_preferences([bad], tokenizer, 64, "p")
    with pytest.raises(DataError, match=r"p row 0 \(0-based\): 'chosen' must end with"):
        build_preferences([{**chat, "chosen": chat["chosen"][:1]}], tokenizer, 64, "p")
    # A row's preamble overrides the stage's; null means the stage's, "" means none.
    rows = [flat, {**flat, "preamble": None}, {**flat, "preamble": ""}, {**flat, "preamble": "Q"}]
    built, stats = build_preferences(rows, tokenizer, 96, "p", preamble="Judge the language.")
    texts = [
        tokenizer.decode(list(r[s > 0]))
        for r, s in zip(built.chosen, built.chosen_segments, strict=True)
    ]
    assert "Judge the language." in texts[0] and texts[0] == texts[1]
    assert texts[2] == tokenizer.decode(list(a.chosen[0][a.chosen_segments[0] > 0]))
    assert "Q" in texts[3] and "Judge" not in texts[3]
    assert stats.pair_types == ["pairs"] * 4 and stats.counts()["pairs_pairs"] == 4


def test_metrics_per_pair_type():
    chosen = np.array([1.0, 2.0, 0.0, -1.0])
    rejected = np.array([0.0, 0.0, 1.0, 0.0])
    metrics = pair_metrics(chosen, rejected, ["language", "language", "ordinary", "ordinary"], "e")
    assert metrics["e_accuracy"] == 0.5
    assert metrics["e_language_accuracy"] == 1.0 and metrics["e_ordinary_accuracy"] == 0.0
    assert metrics["e_language_mean_margin"] == pytest.approx(1.5)
    assert "e_pairs_accuracy" not in pair_metrics(chosen, rejected, ["pairs"] * 4, "e")


def test_reward_model_round_trip_and_shape_check(assets, tmp_path):
    root, tokenizer = assets
    config, backbone = load_hf(root / "sft")
    head = {"w": jnp.linspace(-1, 1, config.embed_dim), "b": jnp.float32(0.25)}
    save_reward_model(config, {"backbone": backbone, "head": head}, tmp_path / "rm")
    loaded_config, params = load_reward_model(tmp_path / "rm")
    assert loaded_config == config and params["head"]["b"].shape == ()
    rows, _ = build_preferences(preference_rows(4, 0), tokenizer, 96, "p")
    expected = reward_scores(
        config, {"backbone": backbone, "head": head}, rows.chosen, rows.chosen_segments
    )
    got = reward_scores(config, params, rows.chosen, rows.chosen_segments)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    save_file(
        {"w": np.zeros(3, np.float32), "b": np.zeros(1, np.float32)},
        str(tmp_path / "rm" / "head.safetensors"),
    )
    with pytest.raises(ValueError, match=r"head.safetensors: expected w \[64\]"):
        load_reward_model(tmp_path / "rm")


@pytest.mark.slow
def test_preamble_reward_model_learns_the_language_criterion(tmp_path):
    # Issue 5: >= 99% on held-out language pairs, ordinary pairs within one point of a reward
    # model trained without language pairs, an English-dominant one markedly worse.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from experiments.reward_language.preamble_rm import gates, run_experiment

    results = run_experiment(tmp_path, steps=300, seed=0)
    failed = [name for name, ok in gates(results).items() if not ok]
    assert not failed, (failed, results)


def test_train_metrics_score_an_even_spread_of_the_training_pairs():
    from posttrain.data.preferences import PreferenceRows
    from posttrain.stages.reward import _metric_subset

    ids = np.arange(10)[:, None] * np.ones((1, 3), np.int32)
    rows = PreferenceRows(ids, ids, ids + 100, ids, np.zeros(10), np.ones(10))
    types = [f"t{i}" for i in range(10)]
    subset, subset_types = _metric_subset(rows, types, 4)
    assert subset.chosen[:, 0].tolist() == [0, 3, 6, 9]
    assert subset.rejected[:, 0].tolist() == [100, 103, 106, 109]
    assert subset_types == ["t0", "t3", "t6", "t9"]
    for everything in (0, 10, 50):
        assert _metric_subset(rows, types, everything)[0].chosen.shape == (10, 3)


def test_scoring_in_larger_calls_gives_the_same_scores(assets):
    from posttrain.stages.reward import RewardConfig, _trimmed, score_pairs

    root, tokenizer = assets
    config, backbone = load_hf(root / "sft")
    head = {"w": jnp.linspace(-1, 1, config.embed_dim), "b": jnp.float32(0.25)}
    params = {"backbone": backbone, "head": head}
    rows, _ = build_preferences(preference_rows(40, 3), tokenizer, 96, "p")
    assert len(rows.chosen) > 32
    small = score_pairs(config, params, rows, 8)
    # Calls of 32: one full call and a short last one.
    large = score_pairs(config, params, rows, 32)
    for a, b in zip(small, large, strict=True):
        assert a.shape == (len(rows.chosen),)
        np.testing.assert_allclose(a, b, atol=1e-5)
    # score_pairs cuts each call's rows after their longest one: the same scores as full width.
    full = reward_scores(config, params, rows.chosen, rows.chosen_segments)
    np.testing.assert_allclose(large[0], full, atol=1e-5)
    shortest = np.argsort(rows.chosen_segments.sum(axis=1))[:8]
    tokens, segments = _trimmed(rows.chosen[shortest], rows.chosen_segments[shortest])
    longest = int(rows.chosen_segments[shortest].sum(axis=1).max())
    assert rows.chosen.shape[1] == 96 and tokens.shape[1] == -(-longest // 32) * 32 < 96
    assert segments.shape == tokens.shape
    trimmed = reward_scores(config, params, tokens, segments)
    np.testing.assert_allclose(trimmed, full[shortest], atol=1e-5)
    stage = dict(init_checkpoint="sft", train="pairs.jsonl", batch_size=8)
    assert RewardConfig(**stage).scoring_batch == 8
    assert RewardConfig(**stage, score_batch_size=64).scoring_batch == 64
    with pytest.raises(ValueError, match="score_batch_size must be 0 or a multiple of"):
        RewardConfig(**stage, score_batch_size=20)
