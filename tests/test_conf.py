"""The config groups compose from the Python presets and match the schemas."""

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException

from posttrain.config_store import (
    model_config_from_node,
    optim_config_from_node,
    preset_node,
    register_configs,
)
from posttrain.models import PRESETS
from posttrain.sharding import MeshConfig

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_config(*overrides: str):
    """The composed `posttrain` config (presets registered), as the command would see it."""
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def test_no_model_yaml_shadows_the_presets():
    assert not list(CONF.glob("model/*.yaml"))  # the ConfigStore entries are the only source


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_group_composes_every_preset(name):
    cfg = compose_config(f"model={name}")
    assert model_config_from_node(cfg.model) == PRESETS[name]


def test_default_model_and_field_override():
    assert model_config_from_node(compose_config().model) == PRESETS["tiny_gemma2"]
    cfg = compose_config("model=gemma2_2b", "model.num_layers=2")
    assert model_config_from_node(cfg.model) == PRESETS["gemma2_2b"].replace(num_layers=2)


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(MissingConfigException, match=r"(?s)model/nope.*gemma2_2b.*tiny_gemma2"):
        compose_config("model=nope")


def test_unknown_model_field_suggests_the_close_one():
    node = preset_node(PRESETS["tiny_gemma2"])
    node["num_layer"] = node.pop("num_layers")
    with pytest.raises(ValueError, match=r"model\.num_layer; did you mean model\.num_layers"):
        model_config_from_node(node)


def test_register_configs_is_idempotent():
    register_configs()
    register_configs()
    # Every backbone's presets (Gemma and RecurrentGemma) form the one `model` group.
    from posttrain.models.backbone import PRESETS as ALL_PRESETS

    assert set(ConfigStore.instance().list("model")) == {f"{name}.yaml" for name in ALL_PRESETS}
    assert set(PRESETS) < set(ALL_PRESETS)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_optim_total_steps_follows_the_stage_unless_set(optimizer):
    cfg = compose_config(f"optim={optimizer}", "stage=sft", "stage.steps=37")
    assert optim_config_from_node(cfg.optim).total_steps == 37
    assert compose_config(f"optim={optimizer}").optim.total_steps == 1000  # stage=sample: no steps
    cfg = compose_config(f"optim={optimizer}", "stage=sft", "optim.total_steps=50")
    assert optim_config_from_node(cfg.optim).total_steps == 50


def test_adafactor_yaml_has_no_adamw_keys():
    cfg = compose_config("optim=adafactor")
    assert "b1" not in cfg.optim and "b2" not in cfg.optim
    optim = optim_config_from_node(cfg.optim)
    assert (optim.decay_rate, optim.momentum, optim.eps) == (0.8, None, 1e-30)
    with pytest.raises(ConfigCompositionException, match="b1"):
        compose_config("optim=adafactor", "optim.b1=0.9")


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


def _stage_yaml(name: str) -> dict:
    from omegaconf import OmegaConf

    # OmegaConf's YAML reading (as Hydra's): `1e-5` is a float, not YAML 1.1's string.
    values = OmegaConf.to_container(OmegaConf.load(CONF / "stage" / f"{name}.yaml"))
    assert values.pop("name") == name
    return values


def _defaults(cls) -> dict:
    import dataclasses

    out = {}
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            out[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            out[field.name] = field.default_factory()
    return out


@pytest.mark.parametrize(
    ("stage", "module", "cls"),
    [
        ("sft", "posttrain.stages.sft", "SFTConfig"),
        ("reward", "posttrain.stages.reward", "RewardConfig"),
        ("synthetic", "posttrain.stages.synthetic", "SyntheticConfig"),
        ("evaluate", "posttrain.stages.evaluate", "EvaluateConfig"),
    ],
)
def test_stage_yaml_is_its_dataclass(stage, module, cls):
    """The YAML is the interface and the dataclass the schema: same keys, same defaults."""
    import dataclasses
    import importlib

    config_class = getattr(importlib.import_module(module), cls)
    values = _stage_yaml(stage)
    assert set(values) == {f.name for f in dataclasses.fields(config_class)}
    for key, default in _defaults(config_class).items():
        # A YAML list is the dataclass's tuple (frozen settings hold tuples).
        assert values[key] == (list(default) if isinstance(default, tuple) else default), key
    required = {f.name for f in dataclasses.fields(config_class)} - set(_defaults(config_class))
    assert all(values[key] == "???" for key in required)


def test_warm_yaml_is_warm_config_plus_the_shared_reward_config():
    import dataclasses

    from posttrain.stages.reward import RewardConfig
    from posttrain.stages.warm import WarmConfig

    values = _stage_yaml("warm")
    own = {f.name for f in dataclasses.fields(WarmConfig)} - {"reward"}
    shared = {f.name for f in dataclasses.fields(RewardConfig)} - {"init_checkpoint", "dropout"}
    assert set(values) == own | shared
    defaults = _defaults(RewardConfig) | _defaults(WarmConfig)
    for key in set(values) - {"init_checkpoints", "train"}:
        assert values[key] == defaults[key], key
    warm = WarmConfig.from_node({**values, "init_checkpoints": ["a", "b"], "train": "p.jsonl"})
    member, checkpoint = warm.member(3)
    assert checkpoint == "b" and member.init_checkpoint == "b" and member.seed == 3
    assert member.dropout == values["dropouts"][1] and warm.learning_rate(3) == 1e-5
    with pytest.raises(ValueError, match=r"did you mean stage\.batch_size"):
        WarmConfig.from_node({**values, "init_checkpoints": "a", "batch_sise": 3})
