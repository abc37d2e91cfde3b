"""Rollouts and the RL stages: the sampler and the trainer agree on log-probs, k samples share
one prefill, the source resumes exactly, a reinforce run SIGKILLed and then SIGTERMed mid-run
resumes bitwise with its EMA anchor, moving-average baseline, sampler RNG and prompt position,
and so does one with extra epochs stopped between two passes of a batch; BOND's anchors move."""

from __future__ import annotations

import json
import os
import shutil
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
from posttrain.rl.rollouts import EpochRollouts, RolloutBatch, RolloutSource, row_width
from posttrain.sampling.sampler import SamplingConfig, generate, left_pad
from posttrain.stages.kit import bundle_tokenizer
from posttrain.stages.reinforce import ReinforceConfig
from posttrain.tokenizer import END_OF_TURN_ID, EOS_ID, GemmaTokenizer, train_tokenizer
from posttrain.train.step import TrainState

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


def _source(policy, k=3, p=4, seed=0, max_new_tokens=12):
    stops = (EOS_ID, END_OF_TURN_ID)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0, stop_ids=stops)
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


def test_training_rows_drop_the_samplers_left_padding_and_score_the_same(policy):
    new = 20  # these prompts: at most 28 tokens, a sampler width of 32; rows 48 wide, not 52
    source = _source(policy, max_new_tokens=new)
    longest = max(len(ids) for ids in source.encoded)
    assert source.row_width == row_width(longest, source.prompt_width, new)
    assert source.row_width < source.prompt_width + new, (longest, source.prompt_width)
    assert source.row_width % 16 == 0 and source.row_width - 16 < longest + new
    batch = source.next_batch(types.SimpleNamespace(params=policy.params))
    assert batch.tokens.shape[1] == source.row_width
    # Widened to the sampler's full width, the rows only gain padding: the same log-probs.
    extra = source.prompt_width + new - source.row_width
    wide = np.pad(batch.tokens, ((0, 0), (0, extra)))
    wide_segments = np.pad(batch.segments, ((0, 0), (0, extra)))
    scored = sequence_token_log_probs(
        policy.config, policy.params, wide[:, :-1], wide[:, 1:], wide_segments[:, :-1]
    )
    mask = batch.response_mask
    narrow = np.asarray(scored)[:, : mask.shape[1]]
    np.testing.assert_allclose(narrow[mask], batch.reference_log_probs[mask], atol=1e-5)


def test_row_width_rounds_up_and_never_exceeds_the_samplers_width():
    assert row_width(37, 64, 24) == 64  # the language-fix recipe: 88 before
    assert row_width(41, 64, 24) == 80
    assert row_width(16, 16, 24) == 40  # 48 aligned, but the sampler's width is smaller
    assert row_width(1, 16, 1) == 16


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


class _CountingSource:
    """Batches of 2 rows x 4 tokens whose rewards count the draws."""

    p, k, prompt_width, row_width, sampling = 1, 2, 2, 4, SamplingConfig(max_new_tokens=2)

    def __init__(self):
        self.draws, self.seconds = 0, {}

    def next_batch(self, state):
        self.draws += 1
        zeros = np.zeros((2, 3), np.float32)
        return RolloutBatch(np.zeros((2, 4), np.int32), np.ones((2, 4), np.int32),
                            np.ones((2, 3), bool), np.full(2, self.draws, np.float32), zeros,
                            zeros, np.full(2, 3, np.int32))  # fmt: skip

    def token_log_probs(self, params, rows):
        return np.full((2, 3), -1.0, np.float32)


def test_epoch_rollouts_serve_each_batch_epochs_times_and_drop_a_failed_one():
    source = _CountingSource()
    rollouts = EpochRollouts(source, epochs=3)
    state = TrainState(None, None, 0, None, rollouts.initial_extras())
    served = []
    for step in (0, 1, 2, 3, 4, 4, 5):  # step 4 is asked for twice: its first try was not finite
        state = state._replace(step=step)
        batch = rollouts.next_batch(state)
        state = rollouts.carry(state, batch)
        served.append((int(batch.rewards[0]), int(state.extras["pass"])))
    assert served == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (3, 0), (3, 1)]
    assert (batch.behaviour_log_probs == -1).all() and source.seconds["generation"] == 0.0
    # The kept batch has the template's shapes and dtypes (what a checkpoint restores into).
    template = rollouts.initial_extras()["rollout"]
    for name, value in state.extras["rollout"].items():
        assert (value.shape, value.dtype) == (template[name].shape, template[name].dtype), name


def test_bad_epoch_settings_are_refused():
    fields = dict(init_checkpoint="", prompts="", reward="")
    assert ReinforceConfig(**fields).epochs == 1  # plain on-policy REINFORCE by default
    for bad, message in (({"epochs": 0}, "stage.epochs must be >= 1"),
                         ({"clip_epsilon": 0.0}, "stage.clip_epsilon must be > 0"),
                         ({"epochs": 2, "per_token_kl": True}, "per_token_kl needs stage.epochs=1")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            ReinforceConfig(**fields, **bad)


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
    # epochs=1: on-policy REINFORCE, one new batch per step, no batch kept in the state.
    assert "clip_fraction" not in rows[-1]
    state = _checkpoint(tmp_path / "run", 6)
    assert set(state["extras"]) == {"baseline"} and _position(tmp_path / "run", 6)["draws"] == 6
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


def _checkpoint(run_dir: Path, step: int) -> dict:
    """The train state of a checkpoint, as saved (no template)."""
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(run_dir / "checkpoints" / str(step) / "state")


def _position(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / str(step) / "data" / "metadata").read_text())


@pytest.mark.slow
def test_extra_epochs_resume_bitwise_between_two_passes_of_a_batch(policy, tmp_path):
    options = ("stage.steps=6", "stage.epochs=2", "stage.save_every=3", "stage.keep_checkpoints=5",
               "stage.bon_pool=0", "stage.reference=ema", "stage.baseline=moving_average")  # fmt: skip
    # Given an uninterrupted run of 6 optimizer steps on 3 batches (2 passes each),
    straight = tmp_path / "straight"
    _reinforce(policy, straight, *options)
    rows = [json.loads(x) for x in (straight / "metrics.jsonl").open()]
    # each batch served twice: the batch's numbers repeat, the second pass is off-policy,
    for first, second in zip(rows[::2], rows[1::2], strict=True):
        assert all(first[k] == second[k] for k in ("reward", "kl_k1", "length", "sampler_gap"))
        assert first["clip_fraction"] == 0 and abs(first["ratio_mean"] - 1) < 1e-4
        assert 0 <= second["clip_fraction"] <= 1 and second["ratio_mean"] != first["ratio_mean"]
    assert _position(straight, 6)["draws"] == 3 and _position(straight, 3)["draws"] == 2
    # when a run is killed between the two passes of its 2nd batch: it leaves what the straight
    # run had after step 3, its checkpoint and log lines (copied: the runs are deterministic),
    killed = tmp_path / "killed"
    shutil.copytree(straight, killed)
    for finished in ("hf", "checkpoints/6"):
        shutil.rmtree(killed / finished)
    (killed / "metrics.json").unlink()
    lines = (straight / "metrics.jsonl").read_text().splitlines(keepends=True)
    (killed / "metrics.jsonl").write_text("".join(lines[:3]))
    metrics = _reinforce(policy, killed, *options)
    # then the resumed run takes the kept batch for its 2nd pass, and ends bitwise the same:
    assert metrics["resumed_from"] == 3 and metrics["steps"] == 6
    resumed = [json.loads(x) for x in (killed / "metrics.jsonl").open()]
    keys = ("loss", "grad_norm", "reward", "kl_k1", "clip_fraction", "ratio_mean")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in rows]
    a = (straight / "hf" / "model.safetensors").read_bytes()
    assert a == (killed / "hf" / "model.safetensors").read_bytes()
    expected, got = _checkpoint(straight, 6), _checkpoint(killed, 6)
    assert jax.tree.structure(expected) == jax.tree.structure(got)
    for x, y in zip(jax.tree.leaves(expected), jax.tree.leaves(got), strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def _reinforce_command(policy, run_dir: Path, save_every: int = 1) -> list[str]:
    return [
        str(BIN / "posttrain"), "stage=reinforce", f"run_dir={run_dir}",
        f"stage.init_checkpoint={policy.root / 'sft'}", f"stage.prompts={policy.root / 'prompts.jsonl'}",
        "stage.reward=language_match", "stage.prompts_per_step=4", "stage.samples_per_prompt=2",
        "stage.max_new_tokens=8", "stage.steps=16", f"stage.save_every={save_every}", "stage.bon_pool=0",
        "stage.reference=ema", "stage.baseline=moving_average", "optim.lr=3e-3", "logger=disabled",
    ]  # fmt: skip


def _logged_steps(run_dir: Path) -> list[int]:
    """The steps of the complete lines of a run's metrics.jsonl (one may be half written)."""
    lines = (run_dir / "metrics.jsonl").read_text().split("\n")[:-1]
    return [json.loads(line)["step"] for line in lines]


@pytest.mark.slow
def test_reinforce_resumes_bitwise_after_sigkill_and_after_sigterm(policy, tmp_path):
    env = {**os.environ, "XLA_FLAGS": ""}
    # Given an uninterrupted 16-step run (EMA reference, moving-average baseline; saved only at
    # its end: nothing reads its other checkpoints, and each costs a save),
    straight = subprocess.run(
        _reinforce_command(policy, tmp_path / "straight", save_every=0),
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-3000:]
    # when the same run is SIGKILLed once its 4th step's checkpoint exists,
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
    # resumed (now saving only when it stops) and SIGTERMed once it has logged a step of its own,
    before = max(_logged_steps(killed_dir))
    command = [str(BIN / "posttrain"), f"resume={killed_dir}"]
    process = subprocess.Popen(
        [*command, "stage.save_every=1000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    while max(_logged_steps(killed_dir), default=0) <= before:
        assert process.poll() is None, process.stderr.read()[-3000:]
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    # it saves that step's checkpoint, says how to resume and exits cleanly, unfinished;
    assert process.returncode == 0, err[-3000:]
    assert f"posttrain resume={killed_dir}" in out
    stopped = json.loads((killed_dir / "interrupted.json").read_text())
    assert stopped["interrupted"] and not (killed_dir / "metrics.json").exists()
    assert 4 <= stopped["resumed_from"] < before < stopped["steps"] < 16
    saved = [int(p.name) for p in (killed_dir / "checkpoints").iterdir() if p.name.isdigit()]
    assert max(saved) == stopped["steps"]
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # then, resumed once more, the policy and every logged step are those of the unbroken run.
    metrics = json.loads((killed_dir / "metrics.json").read_text())
    assert metrics["resumed_from"] == stopped["steps"] and metrics["steps"] == 16
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
    # after the copy at step 2, step 3 samples a policy equal to its anchor: KL 0 up to float32
    # rounding (the loss's forward and the anchor scorer are two programs summing ~100 nats),
    assert abs(rows[2]["kl_to_anchor"]) < 1e-5 and abs(rows[0]["kl_to_anchor"]) < 1e-5
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
    assert abs(rows[0]["kl_to_anchor"]) < 1e-5 and abs(rows[-1]["kl_to_anchor"]) > 1e-4
    summary = json.loads((tmp_path / "jbond" / "summary.json").read_text())
    assert summary["stage"] == "bond" and summary["metrics"]["variant"] == "jbond"
    assert (tmp_path / "jbond" / "reward_vs_kl.png").exists()
