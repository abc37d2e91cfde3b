"""WARM: weight averaging in float32, refusals naming the culprit, greedy soup, the label-noise
experiment of algorithms.md 3.5 on three seeds, and the `warm` stage end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain.checkpoints import save_hf
from posttrain.data.synthetic import bilingual_corpus
from posttrain.data.synthetic_preferences import preference_corpus, preference_rows
from posttrain.models import get_preset, init_params
from posttrain.rewards.reward_model import load_reward_model
from posttrain.rewards.warm import (
    IncompatibleMembersError,
    average_weights,
    check_compatible,
    ensemble,
    greedy_soup,
    interpolate,
)
from posttrain.stages.warm import check_tokenizers
from posttrain.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _tree(value: float, dtype=jnp.float32):
    return {"a": jnp.full((3,), value, dtype), "b": {"c": jnp.full((2, 2), 2 * value, dtype)}}


def test_average_is_the_mean_accumulated_in_float32():
    average = average_weights([_tree(1.0), _tree(2.0), _tree(6.0)])
    np.testing.assert_allclose(average["a"], 3.0)
    np.testing.assert_allclose(average["b"]["c"], 6.0)
    # bfloat16 members: 256 + 1 + 1 is not representable step by step in bfloat16 (8 bits of
    # mantissa), but the float32 accumulation gives the exact mean before the cast back.
    members = [_tree(v, jnp.bfloat16) for v in (256.0, 1.0, 1.0, 2.0)]
    average = average_weights(members)
    assert average["a"].dtype == jnp.bfloat16
    assert float(average["a"][0]) == 65.0
    np.testing.assert_allclose(interpolate(_tree(0.0), _tree(4.0), 0.25)["a"], 1.0)
    np.testing.assert_allclose(ensemble([np.array([1.0, 2.0]), np.array([3.0, 6.0])]), [2.0, 4.0])
    with pytest.raises(ValueError, match="summing to 1"):
        average_weights([_tree(1.0), _tree(2.0)], [0.5, 0.6])


def test_incompatible_members_are_refused_by_name(tmp_path):
    wrong_shape = {"a": jnp.zeros(4), "b": {"c": jnp.zeros((2, 2))}}
    with pytest.raises(IncompatibleMembersError, match=r"m1: \['a'\] is float32\[4\]"):
        check_compatible([_tree(1.0), wrong_shape], ["m0", "m1"])
    with pytest.raises(IncompatibleMembersError, match="m2: parameter tree differs"):
        check_compatible([_tree(1.0), _tree(1.0), {"a": jnp.zeros(3)}], ["m0", "m1", "m2"])
    with pytest.raises(IncompatibleMembersError, match="bfloat16"):
        check_compatible([_tree(1.0), _tree(1.0, jnp.bfloat16)])
    first, second = tmp_path / "a.model", tmp_path / "b.model"
    first.write_bytes(b"one")
    second.write_bytes(b"two")
    check_tokenizers([str(first), str(first)])
    with pytest.raises(IncompatibleMembersError, match=r"b.model differs from .*a.model"):
        check_tokenizers([str(first), str(second)])


def test_greedy_soup_keeps_members_only_while_accuracy_holds():
    # "Accuracy" peaks where the scalar leaf is 1. Best first: 1.1 (-0.1); adding 0.85 gives
    # 0.975 (-0.025, kept); adding 5.0 would give 2.32 (left out).
    members = [{"x": jnp.float32(v)} for v in (5.0, 1.1, 0.85)]
    soup, kept = greedy_soup(members, lambda p: -abs(float(p["x"]) - 1.0))
    assert kept == [1, 2]
    np.testing.assert_allclose(soup["x"], 0.975, rtol=1e-6)


def test_greedy_soup_keeps_a_member_that_leaves_accuracy_equal():
    # Held-out accuracy of a linear reward w on four pairs' chosen-minus-rejected features:
    # a step function, so an addition can leave it exactly equal. A = (1, 0.2) and B = (1, 0.6)
    # rank all four (1.0); their soup (1, 0.4) too, so B stays (WARM's rule: kept when the
    # accuracy does not drop). C = (0.2, 3) ranks three (0.75); the soup of all three,
    # (0.73, 1.27), misranks the third pair, so C is left out.
    differences = np.array([[1.0, 0.0], [1.0, 1.0], [1.0, -1.0], [0.0, 1.0]])
    members = [{"w": jnp.asarray(w, jnp.float32)} for w in ([0.2, 3.0], [1.0, 0.2], [1.0, 0.6])]

    def held_out_accuracy(params):
        return float(np.mean(differences @ np.asarray(params["w"]) > 0))

    assert [held_out_accuracy(m) for m in members] == [0.75, 1.0, 1.0]
    soup, kept = greedy_soup(members, held_out_accuracy)
    assert kept == [1, 2]
    np.testing.assert_allclose(soup["w"], [1.0, 0.4], rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_warm_label_noise_experiment(seed):
    sys.path.insert(0, str(ROOT))
    from experiments.warm.label_noise import gates, run_seed

    result = run_seed(seed, steps=1000)
    failed = [name for name, ok in gates(result).items() if not ok]
    assert not failed, (failed, result)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    train = preference_rows(240, seed=0)
    held_out = preference_rows(120, seed=1)
    tokenizer = train_tokenizer(bilingual_corpus(800) + preference_corpus(train), root / "tok", 700)
    from posttrain.tokenizer import GemmaTokenizer

    config = get_preset("tiny_gemma2", vocab_size=GemmaTokenizer(tokenizer).vocab_size)
    save_hf(config, init_params(config, jax.random.key(0)), root / "sft")
    for name, rows in (("train", train), ("eval", held_out)):
        (root / f"{name}.jsonl").write_text(
            "\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
        )
    return root


def _warm_command(root: Path, run_dir: Path, *overrides: str) -> list[str]:
    """The `stage=warm` command line on the module's assets, with `overrides` added."""
    return [
        sys.executable, "-m", "posttrain.cli", "stage=warm",
        f"stage.init_checkpoints={root / 'sft'}", f"stage.tokenizer={root / 'tok.model'}",
        f"stage.train={root / 'train.jsonl'}", f"stage.eval={root / 'eval.jsonl'}",
        *overrides, "stage.max_length=96", "logger=disabled", f"hydra.run.dir={run_dir}",
    ]  # fmt: skip


@pytest.mark.slow
def test_warm_stage_reports_members_average_and_ensemble(assets, tmp_path):
    command = _warm_command(
        assets, tmp_path, "stage.members=3", "stage.steps=30", "stage.learning_rates=[1e-3,2e-3]"
    )
    env = {**os.environ, "XLA_FLAGS": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("member0", "member1", "member2", "warm", "ensemble"):
        for key in ("accuracy", "language_accuracy", "ordinary_accuracy"):
            assert 0.0 <= metrics[f"{name}_eval_{key}"] <= 1.0
    assert "| warm |" in result.stdout and "| ensemble |" in result.stdout
    # Members differ (learning rate, dropout, data order); the saved model is their mean.
    members = [load_reward_model(path)[1] for path in metrics["members"]]
    infos = [json.loads((Path(p) / "member.json").read_text()) for p in metrics["members"]]
    assert [i["lr"] for i in infos] == [1e-3, 2e-3, 1e-3]
    assert [i["dropout"] for i in infos] == [0.05, 0.1, 0.05]
    _, saved = load_reward_model(metrics["checkpoint"])
    expected = average_weights(members)
    for got, want in zip(jax.tree.leaves(saved), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)
    a, b = (jax.tree.leaves(m["head"]) for m in members[:2])
    assert not np.allclose(a[1], b[1])
    assert metrics["warm_train_accuracy"] > 0.6  # learned something in 30 steps
    # A rerun finds every member finished and only averages again.
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert rerun.returncode == 0 and "member0:" not in rerun.stderr


@pytest.mark.slow
def test_members_fork_from_a_trained_trunk(assets, tmp_path):
    # At a near-zero member learning rate every member equals the trunk it forked from, and the
    # trunk has moved away from the SFT start: members start from the trunk, not from SFT.
    command = _warm_command(
        assets, tmp_path, "stage.members=2", "stage.steps=5", "stage.learning_rates=[1e-9]",
        "stage.trunk_steps=20", "stage.trunk_learning_rate=2e-3", "stage.share_data_order=true",
    )  # fmt: skip
    env = {**os.environ, "XLA_FLAGS": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "| trunk |" in result.stdout
    assert 0.0 <= metrics["trunk_eval_accuracy"] <= 1.0
    _, trunk = load_reward_model(metrics["trunk"])
    trunk_info = json.loads((Path(metrics["trunk"]) / "member.json").read_text())
    assert trunk_info["steps"] == 20 and trunk_info["lr"] == 2e-3
    from posttrain.checkpoints import load_hf

    _, sft = load_hf(assets / "sft")
    moved = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(trunk["backbone"]), jax.tree.leaves(sft), strict=True)
    )
    assert moved > 1e-2
    for path in metrics["members"]:
        _, member = load_reward_model(path)
        for got, want in zip(jax.tree.leaves(member), jax.tree.leaves(trunk), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-6)
    infos = [json.loads((Path(p) / "member.json").read_text()) for p in metrics["members"]]
    assert [i["seed"] for i in infos] == [0, 0]  # share_data_order: one data order
    # One step axis: the members' steps follow the trunk's.
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    member_steps = [r["step"] for r in rows if r.get("member") == "member0" and "step" in r]
    assert member_steps and min(member_steps) > 20


def test_trunk_refuses_several_start_checkpoints():
    from posttrain.stages.warm import WarmConfig

    node = {"init_checkpoints": ["a", "b"], "train": "t.jsonl", "trunk_steps": 10}
    with pytest.raises(ValueError, match="trunk_steps"):
        WarmConfig.from_node(node)
    with pytest.raises(ValueError, match="trunk_steps must be >= 0"):
        WarmConfig.from_node({"init_checkpoints": "a", "train": "t.jsonl", "trunk_steps": -1})
