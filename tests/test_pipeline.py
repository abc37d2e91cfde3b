"""Recipes: validation, and the tiny SFT pipeline end to end (exact match, skip on rerun)."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from posttrain.cli import run_stage
from posttrain.pipeline import load_recipe, run_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_is_valid(recipe):
    loaded = load_recipe(recipe)
    assert loaded["stages"]
    assert recipe.read_text().startswith("#")  # recipes open with their goal and metric


def test_recipe_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"name": "x", "stages": [{"name": "a", "type": "sft", "overides": []}]})
    )
    with pytest.raises(ValueError, match="overides"):
        load_recipe(bad)
    bad.write_text(
        yaml.safe_dump(
            {"name": "x", "stages": [{"name": "a", "type": "sft", "inputs": {"stage.x": "b.out"}}]}
        )
    )
    with pytest.raises(ValueError, match="names no earlier stage"):
        load_recipe(bad)


def test_an_interrupted_stage_is_resumed_not_skipped(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    recipe = tmp_path / "two.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "two",
                "stages": [
                    {"name": "first", "type": "synthetic"},
                    {"name": "second", "type": "synthetic", "inputs": {"stage.seed": "first.n"}},
                ],
            }
        )
    )
    calls = []
    interrupt = {"first": True}

    def fake_stage(ctx):
        name = ctx.run_dir.name
        calls.append(name)
        return {"n": 1, "interrupted": interrupt.pop(name, False)}

    from posttrain.stages.registry import StageSpec

    spec = StageSpec("synthetic", fake_stage, ("stage",), False, ())
    monkeypatch.setattr("posttrain.stages.registry.stage_specs", lambda: {"synthetic": spec})

    def compose(overrides):
        values = dict(o.split("=", 1) for o in overrides)
        return OmegaConf.create(
            {"stage": {"name": "synthetic"}, "run_dir": values["run_dir"], "dry_run": False}
        )

    run_pipeline(recipe, tmp_path / "p", [], compose, run_stage)
    assert calls == ["first"]  # the pipeline stops at the interrupted stage
    assert (tmp_path / "p" / "first" / "interrupted.json").exists()
    assert not (tmp_path / "p" / "first" / "metrics.json").exists()
    outputs = run_pipeline(recipe, tmp_path / "p", [], compose, run_stage)
    assert calls == ["first", "first", "second"]  # resumed, then carried on
    assert outputs["second"] == {"n": 1, "interrupted": False}
    run_pipeline(recipe, tmp_path / "p", [], compose, run_stage)
    assert calls == ["first", "first", "second"]  # both finished: skipped


def _run_recipe(pipeline_dir: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "posttrain.cli",
        f"recipe={ROOT / 'recipes' / 'tiny_sft.yaml'}",
    ]
    command += [f"pipeline_dir={pipeline_dir}", "logger=disabled"]
    env = {**os.environ, "XLA_FLAGS": ""}
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
def test_tiny_sft_pipeline_reaches_exact_match_and_skips_on_rerun(tmp_path):
    first = _run_recipe(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    sft = json.loads((tmp_path / "sft" / "metrics.json").read_text())
    assert sft["eval_exact_match"] >= 0.99
    samples = (tmp_path / "sample" / "samples.jsonl").read_text("utf-8").splitlines()
    assert len(samples) == 200
    again = _run_recipe(tmp_path)
    assert again.returncode == 0
    assert again.stdout.count("finished earlier with the same settings, skipped") == 3


def test_rerun_explains_skips_redo_reruns_dependents_and_stage_overrides_apply(
    tmp_path, monkeypatch, capsys
):
    from posttrain.cli import _compose
    from posttrain.stages.registry import StageSpec

    recipe = tmp_path / "chain.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "name": "chain",
                "stages": [
                    {"name": "data", "type": "synthetic"},
                    {
                        "name": "tune",
                        "type": "sft",
                        "inputs": {"stage.tokenizer": "data.tokenizer"},
                        "overrides": ["data.train=x.jsonl"],
                    },
                ],
            }
        )
    )
    seen = []

    def fake(ctx):
        seen.append((ctx.run_dir.name, OmegaConf.to_container(ctx.cfg.stage)))
        return {"tokenizer": "tok.model", "interrupted": False}

    specs = {name: StageSpec(name, fake, ("stage",), False, ()) for name in ("synthetic", "sft")}
    monkeypatch.setattr("posttrain.stages.registry.stage_specs", lambda: specs)
    run = functools.partial(run_pipeline, recipe, tmp_path / "p", [], _compose, run_stage)
    # `stage.steps` goes to the sft stage only (synthetic has no such key).
    run(stage_overrides=["stage.steps=7"])
    assert [name for name, _ in seen] == ["data", "tune"] and seen[1][1]["steps"] == 7
    # Run again with another value: both skipped, the changed setting named.
    capsys.readouterr()
    run(stage_overrides=["stage.steps=9"])
    out = capsys.readouterr().out
    assert len(seen) == 2
    assert "data: finished earlier with the same settings, skipped" in out
    assert "tune: finished earlier, skipped although its settings changed" in out
    assert "stage.steps: 7 -> 9" in out and "redo=tune" in out
    assert "| tune | sft | skipped (finished) |" in out
    # redo=data runs data again and, since tune reads its outputs, tune too; nothing is lost.
    run(stage_overrides=["stage.steps=9"], redo=["data"])
    assert [name for name, _ in seen[2:]] == ["data", "tune"] and seen[3][1]["steps"] == 9
    assert (tmp_path / "p" / "data.previous-1" / "metrics.json").exists()
    assert (tmp_path / "p" / "tune.previous-1" / "metrics.json").exists()
    with pytest.raises(ValueError, match="redo=\\['nope'\\]: no such stage"):
        run(redo=["nope"])


def test_recipe_command_sends_stage_overrides_to_the_stages_that_have_them():
    from posttrain import cli

    recipe = f"recipe={ROOT / 'recipes' / 'tiny_sft.yaml'}"
    arguments = cli.prepare_arguments([recipe, "stage.steps=5", "stage.sampling.temperature=0.5"])
    # Hydra composes the default stage, whose schema lacks these keys: they are set aside.
    assert arguments == [recipe]
    assert cli._RECIPE_STAGE_OVERRIDES == ["stage.steps=5", "stage.sampling.temperature=0.5"]
    with pytest.raises(cli.OverrideError, match=r"did you mean stage\.steps\?"):
        cli.prepare_arguments([recipe, "stage.stpes=5"])
