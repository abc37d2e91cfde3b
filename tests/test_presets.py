"""Preset parameter counts equal the published ones, from abstract shapes (nothing allocated)."""

import math

import jax
import pytest

from posttrain.models import PRESETS, ModelConfig, abstract_params, get_preset

# (embedding, non-embedding) parameters: Gemma report Table 2 and Gemma 2 report Table 2.
# The embedding counts include the 128 padding rows of the official checkpoints (256128 rows).
PUBLISHED = {
    "gemma_2b": (524_550_144, 1_981_884_416),
    "gemma_7b": (786_825_216, 7_751_248_896),
    "gemma2_2b": (590_118_912, 2_024_517_888),
    "gemma2_9b": (917_962_752, 8_324_201_984),
    "gemma2_27b": (1_180_237_824, 26_047_480_320),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_parameter_count(name):
    shapes = abstract_params(get_preset(name))
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(shapes))
    embedding = math.prod(shapes["embedder"]["input_embedding"].shape)
    total = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
    assert (embedding, total - embedding) == PUBLISHED[name]


def test_bench_30m_preset_is_about_30m():
    shapes = abstract_params(get_preset("bench_gemma2_30m"))
    total = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))
    assert 25e6 < total < 35e6


def test_gemma2_layer_pattern_starts_local():
    config = get_preset("gemma2_9b")
    assert config.layer_types[:4] == ("local", "global", "local", "global")
    assert config.query_scale == 256**-0.5
    assert get_preset("gemma2_27b").query_scale == 144**-0.5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(num_kv_heads=3), "multiple of num_kv_heads"),
        (dict(sliding_window=None), "sliding_window"),
        (dict(dtype="float64"), "dtype"),
        (dict(attention_pattern=("sliding",)), "attention_pattern"),
    ],
)
def test_invalid_config_is_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        get_preset("tiny_gemma2", **change)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(KeyError, match="gemma2_2b"):
        get_preset("gemma3_1b")


def test_all_presets_are_valid_configs():
    assert all(isinstance(config, ModelConfig) for config in PRESETS.values())
