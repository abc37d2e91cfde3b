"""The YAML config groups stay in sync with the Python presets and schemas."""

from pathlib import Path

import pytest
import yaml

from posttrain.models import PRESETS, ModelConfig
from posttrain.sharding import MeshConfig

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("path", sorted((CONF / "model").glob("*.yaml")), ids=lambda p: p.stem)
def test_model_yaml_equals_preset(path):
    fields = yaml.safe_load(path.read_text())
    fields["attention_pattern"] = tuple(fields["attention_pattern"])
    assert ModelConfig(**fields) == PRESETS[path.stem]


def test_every_preset_has_a_yaml():
    assert {p.stem for p in (CONF / "model").glob("*.yaml")} == set(PRESETS)


@pytest.mark.parametrize("path", sorted((CONF / "mesh").glob("*.yaml")), ids=lambda p: p.stem)
def test_mesh_yaml_is_valid(path):
    mesh = MeshConfig(**yaml.safe_load(path.read_text()))
    devices = 1 if path.stem == "single" else 8
    assert mesh.shape(devices)[0] >= 1


def test_host_allocator_auto_reuses_only_for_training_runs():
    """`auto` turns the host allocator setting on for training stages and training recipes."""
    from omegaconf import OmegaConf

    from posttrain.cli import reuses_host_memory

    def config(**values):
        base = {"host_allocator": "auto", "recipe": None, "stage": {"name": "sample"}}
        return OmegaConf.create(base | values)

    assert not reuses_host_memory(config())
    assert reuses_host_memory(config(stage={"name": "reward"}))
    assert reuses_host_memory(config(host_allocator="reuse"))
    assert not reuses_host_memory(config(host_allocator="default", stage={"name": "sft"}))
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny_sft.yaml"
    assert reuses_host_memory(config(recipe=str(recipe)))
