"""Recipe params (values a recipe's user supplies) and dry runs of whole recipes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.pipeline import load_recipe, override_value, recipe_params

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path: Path, params: dict, inputs: dict) -> Path:
    path = tmp_path / "r.yaml"
    stage = {"name": "sft", "type": "sft", "inputs": inputs}
    path.write_text(yaml.safe_dump({"name": "r", "params": params, "stages": [stage]}))
    return path


def test_params_are_checked_where_the_recipe_is_read(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, {"data": "???"}, {"data.train": "params.data"}))
    assert recipe["params"] == {"data": "???"}
    with pytest.raises(ValueError, match=r"no recipe param 'params\.dat'"):
        load_recipe(_recipe(tmp_path, {"data": "???"}, {"data.train": "params.dat"}))


def test_required_params_unknown_params_and_dry_run_placeholders():
    recipe = {"name": "r", "params": {"checkpoint": "???", "tokenizer": None, "steps": 10}}
    with pytest.raises(ValueError, match=r"needs \['checkpoint'\]: pass params\.checkpoint="):
        recipe_params(recipe, [], dry_run=False)
    with pytest.raises(ValueError, match=r"did you mean params\.checkpoint"):
        recipe_params(recipe, ["params.checkpont=/x"], dry_run=False)
    values = recipe_params(recipe, ["params.checkpoint=/ckpt", "params.steps=20"], dry_run=False)
    assert values == {"checkpoint": "/ckpt", "tokenizer": None, "steps": 20}
    # A dry run needs no files: required params become placeholder paths.
    assert recipe_params(recipe, [], dry_run=True)["checkpoint"] == "DRY_RUN/params.checkpoint"


def test_override_values_read_back_as_hydra_reads_them():
    assert override_value(None) == "null" and override_value(True) == "true"
    assert override_value(["a", "b"]) == "[a,b]" and override_value(3e-4) == "0.0003"


@pytest.mark.slow
def test_full_scale_recipe_passes_its_dry_run_on_one_simulated_host(tmp_path):
    """Issue 15: the Gemma 2 2B recipe builds every stage from abstract shapes and fits the
    memory it names (device_memory_gib), on an 8-device mesh; nothing is trained or written
    but the dry-run reports."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    recipe = ROOT / "recipes" / "jpn_language_fix_gemma2_2b.yaml"
    command = [sys.executable, "-m", "posttrain.cli", f"recipe={recipe}"]
    command += [f"pipeline_dir={tmp_path}", "dry_run=true", "logger=disabled"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = [s["name"] for s in load_recipe(recipe)["stages"]]
    limit = yaml.safe_load(recipe.read_text())["overrides"]
    target = next(float(o.split("=")[1].split()[0]) for o in limit if "device_memory_gib" in o)
    for name in stages:
        report = json.loads((tmp_path / name / "dry_run.json").read_text())
        assert report["devices"] == 8 and 2.5e9 < report["parameters"] < 2.7e9, name
        assert 0 < report["memory_bytes_per_device"] <= target * 2**30, name
        assert not (tmp_path / name / "metrics.json").exists()  # a report, not a finished stage
    assert "dry run" in (tmp_path / "results.md").read_text()
    # The same recipe without its required params is refused before any stage runs.
    bare = subprocess.run([*command[:-2], "logger=disabled"], capture_output=True, text=True,
                          env=env, cwd=ROOT)  # fmt: skip
    assert bare.returncode != 0 and "params.checkpoint=" in bare.stderr
