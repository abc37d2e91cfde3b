"""Rollouts and the RL stages: the sampler and the trainer agree on log-probs, k samples share
one prefill, the source resumes exactly, a reinforce run SIGKILLed mid-run resumes bitwise with
its EMA anchor, moving-average baseline, sampler RNG and prompt position; BOND's anchors move."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain.checkpoints import save_hf
from posttrain.data.synthetic import bilingual_corpus, reversal_rows
from posttrain.losses.log_probs import sequence_token_log_probs
from posttrain.models import get_preset, init_params
from posttrain.rewards.api import RuleReward
from posttrain.rl.rollouts import RolloutSource
from posttrain.sampling.sampler import SamplingConfig, generate, left_pad
from posttrain.stages.kit import bundle_tokenizer
from posttrain.tokenizer import END_OF_TURN_ID, EOS_ID, GemmaTokenizer, train_tokenizer

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    """A tiny random policy exported as the SFT stage exports one, and a prompt file."""
    root = tmp_path_factory.mktemp("rl")
    rows = reversal_rows(64, seed=0)
    texts = bilingual_corpus(300) + [r["prompt"] + "\n" + r["response"] for r in rows]
    tokenizer = GemmaTokenizer(train_tokenizer(texts, root / "tok", 700))
    config = get_preset("tiny_gemma2", vocab_size=tokenizer.vocab_size)
    params = jax.tree.map(np.asarray, init_params(config, jax.random.key(0)))
    save_hf(config, params, root / "sft")
    bundle_tokenizer(root / "sft", tokenizer.model_file)
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        "\n".join(json.dumps({"prompt": r["prompt"]}, ensure_ascii=False) for r in rows)
    )
    return types.SimpleNamespace(
        root=root, tokenizer=tokenizer, config=config, params=params, prompts=rows
    )


def _source(policy, k=3, p=4, seed=0):
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, stop_ids=(EOS_ID, END_OF_TURN_ID))
    return RolloutSource(
        policy.config,
        policy.tokenizer,
        [r["prompt"] for r in policy.prompts],
        RuleReward("language_match"),
        sampling,
        p,
        k,
        lambda state: state.params,
        seed=seed,
    )


def test_sampler_log_probs_equal_the_training_forward(policy):
    source = _source(policy)
    state = types.SimpleNamespace(params=policy.params)
    batch = source.next_batch(state)
    assert batch.tokens.shape[0] == 12 and batch.response_mask.any(axis=1).all()
    recomputed = sequence_token_log_probs(
        policy.config,
        policy.params,
        batch.tokens[:, :-1],
        batch.tokens[:, 1:],
        batch.segments[:, :-1],
    )
    mask = batch.response_mask
    gap = np.abs(np.where(mask, np.asarray(recomputed) - batch.sampler_log_probs, 0.0))
    assert gap.max() <= 1e-5, gap.max()
    # The reference here is the policy itself: its per-token log-probs are the same numbers.
    np.testing.assert_allclose(
        batch.reference_log_probs[mask], batch.sampler_log_probs[mask], atol=1e-5
    )
    assert np.all(batch.reference_log_probs[~mask] == 0)
    # Every row's mask covers exactly its response, the stop token included.
    assert (mask.sum(axis=1) == batch.lengths).all()
    # Rewards are the rule's on the decoded text.
    expected = RuleReward("language_match")(source.last_prompts, source.last_responses)
    np.testing.assert_array_equal(batch.rewards, expected)


def test_k_samples_share_one_prefill_and_equal_repeated_prompts(policy):
    tokenizer = policy.tokenizer
    prompts = [
        tokenizer.encode_chat(
            [{"role": "user", "content": r["prompt"]}], add_generation_prompt=True
        )
        for r in policy.prompts[:3]
    ]
    tokens, segments = left_pad(prompts, 32)
    args = (jnp.asarray(1.0), jnp.asarray(0, jnp.int32), jnp.asarray(1.0))
    rng = jax.random.key(5)
    shared = generate(policy.config, policy.params, tokens, segments, rng, *args,
                      max_new_tokens=10, stop_ids=(END_OF_TURN_ID,), samples_per_prompt=4)  # fmt: skip
    repeated = generate(policy.config, policy.params, np.repeat(tokens, 4, 0), np.repeat(segments, 4, 0),
                        rng, *args, max_new_tokens=10, stop_ids=(END_OF_TURN_ID,))  # fmt: skip
    np.testing.assert_array_equal(np.asarray(shared.tokens), np.asarray(repeated.tokens))
    np.testing.assert_allclose(shared.model_log_probs, repeated.model_log_probs, atol=1e-5)
    # The 4 rows of a prompt are different samples, not copies.
    assert len({tuple(row) for row in np.asarray(shared.tokens)[:4]}) > 1


def test_rollout_source_position_resumes_exactly(policy):
    state = types.SimpleNamespace(params=policy.params)
    straight = _source(policy, p=8, seed=3)
    for _ in range(9):  # past an epoch boundary (64 prompts, 8 per batch)
        straight.next_batch(state)
    saved = straight.state()
    expected = straight.next_batch(state)
    resumed = _source(policy, p=8, seed=3)
    resumed.restore(json.loads(json.dumps(saved)))
    got = resumed.next_batch(state)
    assert saved["epoch"] == 1 and saved["draws"] == 9
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="seed"):
        _source(policy, seed=4).restore(saved)


def _run(policy, stage: str, run_dir: Path, *extra: str) -> dict:
    """Run an RL stage in this process (compiled steps are shared between the runs)."""
    from posttrain.cli import _compose, run_stage

    overrides = [
        f"stage={stage}", f"run_dir={run_dir}",
        f"stage.init_checkpoint={policy.root / 'sft'}", f"stage.prompts={policy.root / 'prompts.jsonl'}",
        "stage.reward=language_match", "stage.prompts_per_step=4", "stage.max_new_tokens=8",
        "optim.lr=3e-3", "logger=disabled", *extra,
    ]  # fmt: skip
    return run_stage(_compose(overrides), overrides)


def _reinforce(policy, run_dir: Path, *extra: str) -> dict:
    return _run(
        policy, "reinforce", run_dir, "stage.samples_per_prompt=2", "stage.save_every=0",
        "stage.bon_pool=4", "stage.bon_prompts=4", *extra,
    )  # fmt: skip


@pytest.mark.slow
def test_reinforce_stage_logs_its_metrics_and_plots(policy, tmp_path):
    _reinforce(policy, tmp_path / "run", "stage.steps=6")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    for key in ("loss", "reward", "kl_k1", "kl_k3", "sampler_gap", "entropy", "length", "lr",
                "grad_norm", "seconds_generation", "seconds_scoring", "seconds_reference",
                "seconds_update"):  # fmt: skip
        assert key in rows[-1], key
    # The sampler and the trainer agree; k3 is non-negative term by term.
    assert max(r["sampler_gap"] for r in rows) < 1e-4
    assert all(r["kl_k3"] >= 0 for r in rows)
    for name in ("reward_vs_kl.png", "metrics.png", "summary.md", "bon_curve.json"):
        assert (tmp_path / "run" / name).exists(), name
    curve = json.loads((tmp_path / "run" / "bon_curve.json").read_text())
    assert curve["n"] == [1.0, 2.0, 3.0, 4.0]
    assert curve["reward"] == sorted(curve["reward"])  # E[best of n] grows with n


def _reinforce_command(policy, run_dir: Path) -> list[str]:
    return [
        str(BIN / "posttrain"), "stage=reinforce", f"run_dir={run_dir}",
        f"stage.init_checkpoint={policy.root / 'sft'}", f"stage.prompts={policy.root / 'prompts.jsonl'}",
        "stage.reward=language_match", "stage.prompts_per_step=4", "stage.samples_per_prompt=2",
        "stage.max_new_tokens=8", "stage.steps=16", "stage.save_every=1", "stage.bon_pool=0",
        "stage.reference=ema", "stage.baseline=moving_average", "optim.lr=3e-3", "logger=disabled",
    ]  # fmt: skip


@pytest.mark.slow
def test_reinforce_resumes_bitwise_after_sigkill(policy, tmp_path):
    env = {**os.environ, "XLA_FLAGS": ""}
    # Given an uninterrupted 16-step run (EMA reference, moving-average baseline),
    straight = subprocess.run(
        _reinforce_command(policy, tmp_path / "straight"),
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-3000:]
    # when the same run is SIGKILLed once its 4th step's checkpoint exists, and resumed,
    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(
        _reinforce_command(policy, killed_dir),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    while not (killed_dir / "checkpoints" / "4").exists():
        assert process.poll() is None, process.stderr.read()[-3000:]
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and not (killed_dir / "metrics.json").exists()
    command = [str(BIN / "posttrain"), f"resume={killed_dir}"]
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # then the policy, and every logged step, are bitwise those of the uninterrupted run.
    metrics = json.loads((killed_dir / "metrics.json").read_text())
    assert 4 <= metrics["resumed_from"] < 16 and metrics["steps"] == 16
    a = (tmp_path / "straight" / "hf" / "model.safetensors").read_bytes()
    assert a == (killed_dir / "hf" / "model.safetensors").read_bytes()
    lines = [
        [json.loads(x) for x in (directory / "metrics.jsonl").open()]
        for directory in (tmp_path / "straight", killed_dir)
    ]
    assert [r["step"] for r in lines[1]] == list(range(1, 17))
    for x, y in zip(*lines, strict=True):
        assert all(x[k] == y[k] for k in ("loss", "reward", "kl_k1", "grad_norm")), (x, y)


def _bond(policy, run_dir: Path, *extra: str) -> dict:
    return _run(
        policy, "bond", run_dir, "stage.steps=4", "stage.save_every=0", "stage.bon_pool=0", *extra
    )


@pytest.mark.slow
def test_iterative_bond_replaces_its_anchor_and_jbond_moves_an_ema_anchor(policy, tmp_path):
    # Iterative BOND with N = 4 anchors, 2 policy samples, the anchor copied every 2 steps:
    _bond(policy, tmp_path / "bond", "stage.variant=bond", "stage.n=4", "stage.anchor_period=2")
    rows = [json.loads(x) for x in (tmp_path / "bond" / "metrics.jsonl").open()]
    # after the copy at step 2, step 3 samples a policy equal to its anchor: KL exactly 0,
    assert abs(rows[2]["kl_to_anchor"]) < 1e-6 and abs(rows[0]["kl_to_anchor"]) < 1e-6
    assert abs(rows[1]["kl_to_anchor"]) > 1e-4 and abs(rows[3]["kl_to_anchor"]) > 1e-4
    for row in rows:
        assert row["sampler_gap"] < 1e-4 and 0.0 <= row["win_rate_vs_anchor"] <= 1.0
        assert np.log(1 / 5) - 1e-6 <= row["log_quantile"] <= 0.0  # add-one quantile of 4 anchors
    assert (tmp_path / "bond" / "hf" / "tokenizer.model").exists()
    # J-BOND: the EMA anchor trails the policy, so the KL to it is positive but small against
    # the KL to the SFT reference once the policy has moved.
    _bond(
        policy, tmp_path / "jbond", "stage.variant=jbond", "stage.ema_rate=0.5", "stage.gamma=0.1"
    )
    rows = [json.loads(x) for x in (tmp_path / "jbond" / "metrics.jsonl").open()]
    assert abs(rows[0]["kl_to_anchor"]) < 1e-6 and rows[-1]["kl_to_anchor"] != 0.0
    summary = json.loads((tmp_path / "jbond" / "summary.json").read_text())
    assert summary["stage"] == "bond" and summary["metrics"]["variant"] == "jbond"
    assert (tmp_path / "jbond" / "reward_vs_kl.png").exists()
