"""The README's quickstart, run as printed, and the stage kit's promises checked on its outputs:
each stage's files, self-contained exports, consistency checks before any work, resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGES = ("data", "sft", "sample", "reward", "warm")


def readme_commands() -> list[str]:
    """The commands of the README's quickstart block, continuation lines joined."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- quickstart -->\n```bash\n(.*?)```\n<!-- /quickstart -->", text, re.S)
    assert block, "README.md has no quickstart block"
    return [c for c in block.group(1).replace("\\\n", " ").splitlines() if c.strip()]


def shell(command: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run one command line through bash, with `.venv/bin/` meaning this test's environment."""
    env = {**os.environ, "XLA_FLAGS": "", "WANDB_SILENT": "true"}
    command = command.replace(".venv/bin/", f"{BIN}/")
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def posttrain(*arguments: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": ""}
    command = [str(BIN / "posttrain"), *arguments]
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quickstart")
    for command in readme_commands():
        result = shell(command, root)
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    return root / "runs" / "quickstart"


@pytest.mark.slow
def test_the_readme_sequence_runs_as_printed_and_each_stage_leaves_its_files(quickstart):
    assert len(readme_commands()) == len(STAGES)
    for stage in STAGES:
        directory = quickstart / stage
        metrics = json.loads((directory / "metrics.json").read_text(encoding="utf-8"))
        summary = json.loads((directory / "summary.json").read_text(encoding="utf-8"))
        assert summary["stage"] in ("synthetic", "sft", "sample", "reward", "warm")
        assert (directory / "summary.md").read_text(encoding="utf-8").startswith("## ")
        config = (directory / "config.yaml").read_text(encoding="utf-8")
        assert "???" not in config and f"run_dir: runs/quickstart/{stage}" in config
        lines = (directory / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        assert lines and all("step" in json.loads(line) for line in lines)
        # Training stages plot their steps; the data generator its counts.
        assert (directory / "metrics.png").stat().st_size > 10_000
        assert not metrics.get("interrupted")
    sft_lines = [json.loads(x) for x in (quickstart / "sft" / "metrics.jsonl").open()]
    assert [row["step"] for row in sft_lines] == list(range(1, 61))
    assert {"loss", "lr", "grad_norm", "tokens_per_second"} <= set(sft_lines[0])
    assert sft_lines[-1]["loss"] < sft_lines[0]["loss"]
    # The random model took the tokenizer's vocabulary, and the saved config says so.
    tokenizer_pieces = 700
    sft_config = json.loads((quickstart / "sft" / "hf" / "config.json").read_text())
    assert sft_config["vocab_size"] == tokenizer_pieces
    assert f"vocab_size: {tokenizer_pieces}" in (quickstart / "sft" / "config.yaml").read_text()
    # Japanese prompts are readable in the JSONL outputs, not \\u-escaped.
    samples = (quickstart / "sample" / "samples.jsonl").read_text(encoding="utf-8")
    assert "逆順" in samples  # written as text (a \\u escape would not contain it)
    rewards = [json.loads(line)["reward"] for line in samples.splitlines()]
    assert len(rewards) == 200 and set(rewards) <= {0.0, 1.0}
    # Exports carry their tokenizer; the reward model its preamble.
    for export in ("sft/hf", "reward/reward_model", "warm/reward_model"):
        copied = (quickstart / export / "tokenizer.model").read_bytes()
        assert copied == (quickstart / "data" / "tokenizer.model").read_bytes()
    preamble = json.loads((quickstart / "reward" / "reward_model" / "posttrain.json").read_text())
    assert preamble == {"preamble": "Judge whether the reply is in the language of the prompt."}
    warm = json.loads((quickstart / "warm" / "metrics.json").read_text())
    assert len(warm["members"]) == 2 and 0.0 <= warm["warm_eval_accuracy"] <= 1.0
    table = (quickstart / "warm" / "summary.md").read_text(encoding="utf-8")
    assert "| member0 |" in table and "| ensemble |" in table


@pytest.mark.slow
def test_a_reward_model_export_scores_without_being_told_its_tokenizer(quickstart):
    from posttrain.rewards.api import ModelReward

    reward = ModelReward(quickstart / "reward" / "reward_model")
    assert reward.preamble == "Judge whether the reply is in the language of the prompt."
    scores = reward(["数字を逆順にしてください: 1 2 3", "Hi"], ["3 2 1", "Hello"])
    assert scores.shape == (2,) and scores.dtype.name == "float32"


@pytest.mark.slow
def test_a_different_tokenizer_is_refused_naming_both(quickstart, tmp_path):
    from posttrain.data.synthetic import bilingual_corpus
    from posttrain.tokenizer import train_tokenizer

    other = train_tokenizer(bilingual_corpus(200), tmp_path / "other", 500)
    started = time.perf_counter()
    result = posttrain(
        "stage=reward",
        f"run_dir={tmp_path / 'r'}",
        f"stage.init_checkpoint={quickstart / 'sft' / 'hf'}",
        f"stage.train={quickstart / 'data' / 'pairs.jsonl'}",
        f"stage.tokenizer={other}",
        "logger=disabled",
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert str(other) in result.stderr and str(quickstart / "sft" / "hf") in result.stderr
    assert "differs" in result.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()
    assert time.perf_counter() - started < 60
    # A checkpoint without its tokenizer, given one of another vocabulary: named, both sizes.
    bare = tmp_path / "bare"
    shutil.copytree(quickstart / "sft" / "hf", bare)
    (bare / "tokenizer.model").unlink()
    result = posttrain(
        "stage=sample",
        f"run_dir={tmp_path / 's'}",
        f"stage.checkpoint={bare}",
        f"stage.tokenizer={other}",
        f"stage.prompts={quickstart / 'data' / 'prompts.jsonl'}",
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "vocabulary of 700" in result.stderr and "500 pieces" in result.stderr
    assert not (tmp_path / "s" / "samples.jsonl").exists()


@pytest.mark.slow
def test_resume_refuses_a_change_that_breaks_exactness_and_continues_in_place(quickstart):
    cwd = quickstart.parent.parent
    refused = posttrain("resume=runs/quickstart/sft", "optim.lr=1e-3", cwd=cwd)
    assert refused.returncode != 0
    assert "optim.lr: 0.003 -> 0.001" in refused.stderr and "force_resume=true" in refused.stderr
    before = (quickstart / "sft" / "metrics.jsonl").read_text()
    resumed = posttrain("resume=runs/quickstart/sft", "logger=disabled", cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "logger.mode: 'offline' -> 'disabled'" in resumed.stderr  # a safe change, listed
    metrics = json.loads((quickstart / "sft" / "metrics.json").read_text())
    assert metrics["resumed_from"] == 60 and metrics["steps_run"] == 0
    assert (quickstart / "sft" / "metrics.jsonl").read_text() == before
    assert not list(cwd.glob("runs/sft"))  # no second directory for the same run


def test_memory_check_refuses_gemma2_2b_within_seconds(tmp_path):
    from posttrain.data.synthetic import bilingual_corpus
    from posttrain.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(bilingual_corpus(200), tmp_path / "tok", 500)
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    started = time.perf_counter()
    result = posttrain(
        "stage=sft",
        "model=gemma2_2b",
        f"run_dir={tmp_path / 'big'}",
        f"data.train={tmp_path / 'train.jsonl'}",
        f"stage.tokenizer={tokenizer}",
        "logger=disabled",
        cwd=tmp_path,
        timeout=120,
    )
    elapsed = time.perf_counter() - started
    assert result.returncode != 0 and elapsed < 30, (elapsed, result.stderr[-2000:])
    assert re.search(r"needs an estimated \d+\.\d+ GiB per device", result.stderr)
    assert re.search(r"GiB available \(host MemAvailable", result.stderr)
    assert "force_memory=true" in result.stderr
    assert not (tmp_path / "big" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (("stage=sft", "+stage.stpes=3"), "stage.stpes is not a key of"),
        (("stage=sft", "stage.stpes=3"), "did you mean stage.steps?"),
        (("stage=sft", "+stage.stpes=3"), "`+` cannot add keys"),
        (("stage=reward", "optim.lrr=1"), "did you mean optim.lr?"),
    ],
)
def test_unknown_keys_fail_before_hydra_with_a_suggestion(tmp_path, arguments, expected):
    result = posttrain(*arguments, cwd=tmp_path, timeout=60)
    assert result.returncode != 0 and expected in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_bad_value_is_blamed_on_its_own_key(tmp_path):
    result = posttrain(
        "stage=sft", "data.train=x.jsonl", "stage.tokenizer=t.model", "stage.steps=-1",
        cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "stage.steps must be >= 1, got -1" in result.stderr
    assert "warmup" not in result.stderr


@pytest.mark.slow
def test_the_reward_stage_starts_from_the_linear_probe(quickstart, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from reward_checks import assert_head_is_linear_probe

    from posttrain.stages.reward import RewardConfig, load_preference_splits
    from posttrain.tokenizer import GemmaTokenizer

    # One step at a vanishing learning rate leaves the head where the probe put it.
    result = posttrain(
        "stage=reward",
        f"run_dir={tmp_path / 'probe'}",
        f"stage.init_checkpoint={quickstart / 'sft' / 'hf'}",
        f"stage.train={quickstart / 'data' / 'pairs.jsonl'}",
        "stage.steps=1",
        "stage.probe_pairs=64",
        "optim.lr=1e-12",
        "logger=disabled",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stage = RewardConfig(
        init_checkpoint=str(quickstart / "sft" / "hf"),
        train=str(quickstart / "data" / "pairs.jsonl"),
    )
    tokenizer = GemmaTokenizer(quickstart / "sft" / "hf" / "tokenizer.model")
    rows = load_preference_splits(stage, tokenizer, 8).train
    assert_head_is_linear_probe(tmp_path / "probe" / "reward_model", rows, pairs=64, atol=1e-4)
