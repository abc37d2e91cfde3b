"""A tiny RecurrentGemma through the same stage code as Gemma, selected by
`model=tiny_recurrentgemma`: SFT lowers its loss and exports a recurrent_gemma directory, a
reward model on it learns an easy preference (each shared prompt run once, its state forked
into both sides), and REINFORCE and J-BOND (scored by that reward model) run and export a
policy that loads and samples. In-process, tiny steps: one compiled step per stage."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest

from posttrain.checkpoints import load_hf
from posttrain.data.synthetic import bilingual_corpus, reversal_rows
from posttrain.data.synthetic_preferences import preference_rows
from posttrain.models import RecurrentGemmaConfig
from posttrain.sampling import SamplingConfig, sample
from posttrain.tokenizer import train_tokenizer


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    return path


def _run(run_dir: Path, *overrides: str) -> dict:
    """Run a stage in this process, as the `posttrain` command would."""
    from posttrain.cli import _compose, run_stage

    overrides = [f"run_dir={run_dir}", "logger=disabled", *overrides]
    return run_stage(_compose(overrides), overrides)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def _loads_and_samples(directory: str) -> None:
    """The exported policy is a RecurrentGemma directory whose model samples."""
    config, params = load_hf(directory)
    assert isinstance(config, RecurrentGemmaConfig)
    out = sample(config, params, [[2, 5, 9], [2, 7]], SamplingConfig(4, stop_ids=(1,)))
    assert out.tokens.shape == (2, 4) and np.all(np.asarray(out.lengths) >= 1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Data, a tokenizer, and the SFT run every later stage starts from."""
    root = tmp_path_factory.mktemp("rg_stages")
    rows = reversal_rows(96, seed=0)
    texts = bilingual_corpus(200) + [r["prompt"] + "\n" + r["response"] for r in rows]
    train_tokenizer(texts, root / "tok", 700)
    _write_jsonl(root / "train.jsonl", rows)
    _write_jsonl(root / "prompts.jsonl", [{"prompt": r["prompt"]} for r in rows])
    # An easy preference: Japanese prompts, the Japanese reply chosen over an English one.
    language = dict(mix={"language": 1.0}, english_fraction=0.0)
    _write_jsonl(root / "pairs.jsonl", preference_rows(64, 0, **language))
    _write_jsonl(root / "pairs_eval.jsonl", preference_rows(32, 1, **language))
    sft = _run(
        root / "sft", "stage=sft", "model=tiny_recurrentgemma", "model.num_layers=3",
        f"data.train={root / 'train.jsonl'}", f"stage.tokenizer={root / 'tok.model'}",
        "data.batch_size=8", "data.max_length=48", "stage.steps=30", "stage.save_every=0",
        "optim.lr=3e-3",
    )  # fmt: skip
    return types.SimpleNamespace(root=root, sft=sft)


def test_sft_lowers_the_loss_and_exports_a_recurrent_gemma_directory(runs):
    rows = _metrics(runs.root / "sft")
    assert len(rows) == 30
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < 0.8 * first, (first, last)
    # The export is what the later stages start from (they load it and sample from it).
    hf = json.loads((Path(runs.sft["checkpoint"]) / "config.json").read_text())
    assert hf["model_type"] == "recurrent_gemma" and hf["num_hidden_layers"] == 3


@pytest.fixture(scope="module")
def reward_model(runs):
    root = runs.root
    return _run(
        root / "reward", "stage=reward", f"stage.init_checkpoint={runs.sft['checkpoint']}",
        f"stage.train={root / 'pairs.jsonl'}", f"stage.eval={root / 'pairs_eval.jsonl'}",
        "stage.max_length=64", "stage.steps=12", "stage.save_every=0", "stage.probe_pairs=64",
        "optim.lr=3e-4",
    )  # fmt: skip


def test_reward_model_learns_an_easy_preference(reward_model):
    # Far above chance (0.5) on held-out pairs too.
    assert reward_model["train_accuracy"] >= 0.9, reward_model
    assert reward_model["eval_accuracy"] >= 0.9, reward_model
    # It trained on forked pairs: each prompt run once, its state seeding both sides.
    assert reward_model["prompt_sharing"] == "fork", reward_model
    config, _ = load_hf(reward_model["checkpoint"])
    assert isinstance(config, RecurrentGemmaConfig)
    assert (Path(reward_model["checkpoint"]) / "head.safetensors").exists()


def _rl_options(runs) -> list[str]:
    root = runs.root
    return [
        f"stage.init_checkpoint={runs.sft['checkpoint']}", f"stage.prompts={root / 'prompts.jsonl'}",
        "stage.prompts_per_step=2", "stage.max_new_tokens=6", "stage.steps=3",
        "stage.save_every=0", "stage.bon_pool=0", "stage.sample_every=0", "optim.lr=1e-3",
    ]  # fmt: skip


def test_reinforce_runs_and_exports_a_policy_that_samples(runs):
    run_dir = runs.root / "reinforce"
    metrics = _run(
        run_dir, "stage=reinforce", *_rl_options(runs), "stage.reward=language_match",
        "stage.samples_per_prompt=2",
    )  # fmt: skip
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # The sampler's log-probs are the training forward's; every step moved the policy.
    assert max(r["sampler_gap"] for r in rows) < 1e-4
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    _loads_and_samples(metrics["checkpoint"])


def test_jbond_scored_by_the_reward_model_runs_and_exports(runs, reward_model):
    run_dir = runs.root / "jbond"
    metrics = _run(
        run_dir, "stage=bond", "stage.variant=jbond", *_rl_options(runs),
        f"stage.reward={reward_model['checkpoint']}",
    )  # fmt: skip
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert max(r["sampler_gap"] for r in rows) < 1e-4
    assert all(np.isfinite(r["loss"]) for r in rows)
    _loads_and_samples(metrics["checkpoint"])
