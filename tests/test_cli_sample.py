"""The `posttrain` Hydra command: the sample stage end to end, and config errors."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from posttrain.checkpoints import save_hf
from posttrain.data.synthetic import bilingual_corpus
from posttrain.models import get_preset, init_params
from posttrain.tokenizer import GemmaTokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def posttrain(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the console command in a fresh process (as a user would)."""
    command = [sys.executable, "-m", "posttrain.cli", *overrides]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tokenizer_path = train_tokenizer(bilingual_corpus(800), root / "tok", 700)
    vocab = GemmaTokenizer(tokenizer_path).vocab_size
    config = get_preset("tiny_gemma2", vocab_size=vocab)
    save_hf(config, init_params(config, jax.random.key(0)), root / "ckpt")
    prompts = root / "prompts.jsonl"
    rows = [{"prompt": "12 たす 7 はいくつですか？"}, {"prompt": "What is 3 plus 4?"}]
    rows.append({"prompt": [{"role": "user", "content": "Tell me about trains."}]})
    prompts.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    return root, tokenizer_path, prompts


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sample", "best_of_n", "beam"])
def test_sample_stage_writes_jsonl(assets, method):
    root, tokenizer_path, prompts = assets
    out = root / f"{method}.jsonl"
    result = posttrain(
        "stage=sample",
        f"stage.checkpoint={root / 'ckpt'}",
        f"stage.tokenizer={tokenizer_path}",
        f"stage.prompts={prompts}",
        f"stage.output={out}",
        f"stage.method={method}",
        "stage.num_samples=2",
        "stage.reward=language_match",
        "stage.sampling.max_new_tokens=6",
        f"hydra.run.dir={root / ('run_' + method)}",
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == (6 if method == "sample" else 3)
    assert rows[0]["prompt"] == "12 たす 7 はいくつですか？"
    assert rows[-1]["prompt"] == "Tell me about trains."
    for row in rows:
        assert set(row) == {"prompt", "response", "log_prob", "num_tokens", "finished", "reward"}
        assert 1 <= row["num_tokens"] <= 6 and row["log_prob"] <= 0
        assert row["reward"] in (0.0, 1.0)
    metrics = json.loads((root / ("run_" + method) / "metrics.json").read_text())
    assert metrics["num_rows"] == len(rows)


def test_mistyped_key_fails_before_work(tmp_path):
    result = posttrain("stage=sample", "stage.sampling.temprature=0.5", cwd=tmp_path)
    assert result.returncode != 0
    assert "temprature" in result.stderr
    assert not list(tmp_path.rglob("samples.jsonl"))


def test_missing_required_value_is_named(tmp_path):
    result = posttrain("stage=sample", cwd=tmp_path)
    assert result.returncode != 0
    assert "stage.checkpoint" in result.stderr


def test_unknown_host_allocator_is_named(tmp_path):
    result = posttrain("stage=sample", "host_allocator=jemalloc", cwd=tmp_path)
    assert result.returncode != 0
    assert "host_allocator" in result.stderr and "jemalloc" in result.stderr
