"""The sft stage from the command line: exact resume after SIGKILL, SIGTERM, config errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from posttrain.data.synthetic import bilingual_corpus, reversal_rows
from posttrain.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_cli")
    rows = reversal_rows(400, seed=0)
    (root / "train.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    texts = bilingual_corpus(400) + [r["prompt"] + "\n" + r["response"] for r in rows]
    train_tokenizer(texts, root / "tok", 700)
    return root


def command(root: Path, run_dir: Path, *extra: str) -> list[str]:
    """A small but not instant SFT run (so that it can be killed in flight)."""
    return [
        sys.executable, "-m", "posttrain.cli", "stage=sft", "model=bench_gemma2_4l",
        f"data.train={root / 'train.jsonl'}", f"stage.tokenizer={root / 'tok.model'}",
        "data.batch_size=8", "data.max_length=40", "stage.save_every=10", "logger=disabled",
        "optim.lr=1e-3", "optim.warmup_steps=5", f"hydra.run.dir={run_dir}", *extra,
    ]  # fmt: skip


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": ""}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def final_params(run_dir: Path) -> dict:
    return load_file(str(run_dir / "hf" / "model.safetensors"))


def wait_for_checkpoint(run_dir: Path, step: int, process: subprocess.Popen) -> None:
    target = run_dir / "checkpoints" / str(step)
    while not target.exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        time.sleep(0.01)


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_exact(workdir):
    straight = workdir / "straight"
    assert run(command(workdir, straight, "stage.steps=40")).returncode == 0
    killed = workdir / "killed"
    process = subprocess.Popen(
        command(workdir, killed, "stage.steps=40"),
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "XLA_FLAGS": ""},
    )
    wait_for_checkpoint(killed, 20, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "metrics.json").exists()  # it really died mid-run
    resumed = run(command(workdir, killed, "stage.steps=40"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((killed / "metrics.json").read_text())
    assert metrics["resumed_from"] >= 20 and metrics["steps"] == 40
    expected, got = final_params(straight), final_params(killed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert expected[name].tobytes() == got[name].tobytes(), name


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(workdir):
    run_dir = workdir / "terminated"
    process = subprocess.Popen(
        command(workdir, run_dir, "stage.steps=100000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "XLA_FLAGS": ""},
    )
    wait_for_checkpoint(run_dir, 10, process)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0
    assert f"posttrain resume={run_dir}" in out
    # Not metrics.json: that marks a finished stage, which a recipe would skip instead of resume.
    assert not (run_dir / "metrics.json").exists()
    metrics = json.loads((run_dir / "interrupted.json").read_text())
    assert metrics["interrupted"] is True
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == metrics["steps"] >= 10
    # The printed command continues in the same directory; a shorter horizon needs force_resume.
    target = metrics["steps"] + 3
    resume = [sys.executable, "-m", "posttrain.cli", f"resume={run_dir}", f"stage.steps={target}"]
    refused = run(resume)
    assert refused.returncode != 0 and "optim.total_steps: 100000 -> " in refused.stderr
    resumed = run([*resume, "force_resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    finished = json.loads((run_dir / "metrics.json").read_text())
    assert finished["resumed_from"] == metrics["steps"] and finished["steps"] == target
    assert not (run_dir / "interrupted.json").exists()


def test_mistyped_override_fails_naming_the_key(workdir, tmp_path):
    result = run(command(workdir, tmp_path / "x", "optim.lrr=1e-3"))
    assert result.returncode != 0 and "lrr" in result.stderr
    assert not (tmp_path / "x" / "checkpoints").exists()


def test_bad_value_fails_before_work(workdir, tmp_path):
    result = run(command(workdir, tmp_path / "x", "optim.schedule=stepwise"))
    assert result.returncode != 0 and "optim.schedule" in result.stderr


def test_dry_run_allocates_nothing_and_reports(tmp_path):
    # No data and no tokenizer: a dry run only builds abstract shapes.
    cmd = [sys.executable, "-m", "posttrain.cli", "stage=sft", "model=gemma2_9b", "dry_run=true"]
    result = run([*cmd, f"hydra.run.dir={tmp_path / 'dry'}"])
    assert result.returncode == 0, result.stderr[-2000:]
    # The report is dry_run.json: a metrics.json would mark a finished stage to a recipe.
    metrics = json.loads((tmp_path / "dry" / "dry_run.json").read_text())
    assert metrics["parameters"] == 917_962_752 + 8_324_201_984
    assert not (tmp_path / "dry" / "metrics.json").exists()


@pytest.mark.slow
def test_sweep_makes_one_comparable_run_per_value(workdir, tmp_path):
    cmd = command(workdir, tmp_path / "unused", "stage.steps=6", "stage.save_every=0")
    cmd = [c for c in cmd if not c.startswith("hydra.run.dir")]
    cmd = [*cmd[:3], "-m", *cmd[3:], "optim.lr=0.001,0.01", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    result = run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    # Job directories are named by the swept value, and one table compares the jobs.
    assert [p.parent.name for p in runs] == ["0_optim.lr=0.001", "1_optim.lr=0.01"]
    table = (tmp_path / "sweep" / "sweep.md").read_text()
    assert table in result.stdout and "optim.lr" in table
    assert "0.001" in table and "0.01" in table
    assert [json.loads(p.read_text())["steps"] for p in runs] == [6, 6]
    configs = [(p.parent / ".hydra" / "overrides.yaml").read_text() for p in runs]
    assert "optim.lr=0.001" in configs[0] and "optim.lr=0.01" in configs[1]
