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
