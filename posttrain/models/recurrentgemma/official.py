"""The official RecurrentGemma checkpoint (google-deepmind/recurrentgemma): load and write.

On disk it is an Orbax PyTree of the official `Griffin` parameter tree (`embedder/
input_embedding`, `blocks.{i}/...`, `final_norm/scale`; `shared/design/backbone.md` §3.4), which
is our tree as it is, so nothing is renamed. The official writer wraps it as {'params': tree};
a bare tree is read too.

The checkpoint holds no hyperparameters. Its shapes fix the architecture (`architecture_of`);
the given config (the `model=` preset) supplies the rest (window, soft cap, dtypes) and is
checked against the shapes before any array is read, and a mismatch names the tensor and what
the checkpoint's shapes say. The window semantics is "official": these weights were trained
with each query seeing W + 1 keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from posttrain.checkpoints.huggingface import CheckpointError
from posttrain.checkpoints.official import restore_orbax_tree
from posttrain.models.recurrentgemma.config import PRESETS, RecurrentGemmaConfig
from posttrain.models.recurrentgemma.model import abstract_params

Params = dict[str, Any]

# The fields the tree's shapes determine; everything else comes from the config.
_SHAPE_FIELDS = (
    "vocab_size",
    "width",
    "num_layers",
    "block_pattern",
    "num_heads",
    "lru_width",
    "mlp_width",
    "conv_width",
)


def _unwrap(tree: Params) -> Params:
    """The parameter tree, without the {'params': ...} level the official writer adds."""
    return tree["params"] if set(tree) == {"params"} else tree


def _period(kinds: list[str]) -> tuple[str, ...]:
    """The shortest prefix whose repetition gives `kinds` (r, r, a, r, r -> r, r, a)."""
    for size in range(1, len(kinds) + 1):
        if all(kind == kinds[i % size] for i, kind in enumerate(kinds)):
            return tuple(kinds[:size])
    return tuple(kinds)


def architecture_of(tree: Params) -> dict[str, Any]:
    """The config fields an official tree's shapes determine (vocab_size, width, num_layers,
    block_pattern, num_heads, lru_width, mlp_width, conv_width)."""
    tree = _unwrap(tree)
    try:
        vocab, width = np.shape(tree["embedder"]["input_embedding"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError("official tree has no embedder/input_embedding [v, d]") from error
    fields: dict[str, Any] = {"vocab_size": vocab, "width": width}
    kinds = []
    while f"blocks.{len(kinds)}" in tree:
        block = tree[f"blocks.{len(kinds)}"]
        if "recurrent_block" in block:
            kinds.append("recurrent")
            # RG-LRU gates are block-diagonal: w [n, l/n, l/n].
            n, per_head, _ = np.shape(block["recurrent_block"]["rg_lru"]["a_gate"]["w"])
            fields.setdefault("num_heads", n)
            fields.setdefault("lru_width", n * per_head)
            fields.setdefault("conv_width", np.shape(block["recurrent_block"]["conv_1d"]["w"])[0])
        elif "attention_block" in block:
            kinds.append("attention")
            # Multi-query attention: proj_k is [d, h], one key head of h = d / n dims.
            head_dim = np.shape(block["attention_block"]["proj_k"]["kernel"])[1]
            fields.setdefault("num_heads", width // head_dim)
        else:
            raise CheckpointError(
                f"official tree blocks.{len(kinds)} has neither a recurrent_block nor an "
                f"attention_block (keys {sorted(block)})"
            )
    if not kinds:
        raise CheckpointError("official tree has no blocks.0")
    fields["num_layers"] = len(kinds)
    fields["block_pattern"] = _period(kinds)
    fields["mlp_width"] = np.shape(tree["blocks.0"]["mlp_block"]["ffw_up"]["w"])[-1]
    return {name: fields[name] for name in _SHAPE_FIELDS if name in fields}


def _hint(tree: Params, config: RecurrentGemmaConfig) -> str:
    """What the tree's shapes say where they differ from the config, and a preset that fits."""
    try:
        found = architecture_of(tree)
    except (CheckpointError, KeyError, TypeError, ValueError):
        # Not a Griffin tree at all (a Gemma one, say): its top-level keys tell what it is.
        keys = sorted(tree)
        return f" (the checkpoint's top-level keys are {keys[:4]}{' ...' if len(keys) > 4 else ''})"
    differ = {k: v for k, v in found.items() if getattr(config, k) != v}
    if not differ:
        return ""
    given = ", ".join(f"{k}={getattr(config, k)}" for k in differ)
    says = ", ".join(f"{k}={v}" for k, v in differ.items())
    presets = [
        name
        for name, preset in PRESETS.items()
        if all(getattr(preset, k) == v for k, v in found.items())
    ]
    fits = f"; preset {presets[0]} has these shapes" if presets else ""
    return f" (the checkpoint's shapes say {says}, the config {given}{fits})"


def check_tree(tree: Params, config: RecurrentGemmaConfig) -> None:
    """Fail naming the first missing, mis-shaped or unexpected tensor of an official tree (its
    leaves may be arrays or shape structs)."""
    tree = _unwrap(tree)
    expected = jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]
    got = dict(jax.tree_util.tree_flatten_with_path(tree)[0])

    def name(path: Any) -> str:
        return jax.tree_util.keystr(path, simple=True, separator="/")

    for path, leaf in expected:
        if path not in got:
            raise CheckpointError(
                f"official checkpoint is missing {name(path)}{_hint(tree, config)}"
            )
        shape = tuple(np.shape(got[path]))
        if shape != tuple(leaf.shape):
            raise CheckpointError(
                f"official tensor {name(path)} has shape {shape}, the config expects "
                f"{tuple(leaf.shape)}{_hint(tree, config)}"
            )
    expected_paths = {path for path, _ in expected}
    for path in got:
        if path not in expected_paths:
            raise CheckpointError(
                f"official checkpoint has unexpected tensor {name(path)}{_hint(tree, config)}"
            )


def load_official(
    path: str | Path,
    config: RecurrentGemmaConfig,
    sharding: jax.sharding.Sharding | None = None,
) -> tuple[RecurrentGemmaConfig, Params]:
    """Restore an official RecurrentGemma Orbax checkpoint for a model of `config`'s shape;
    arrays are read as `config.param_dtype` onto `sharding` (default: the first device)."""
    config = config.replace(window_semantics="official")
    tree = restore_orbax_tree(
        path, config.param_dtype, sharding, lambda shapes: check_tree(shapes, config)
    )
    return config, _unwrap(tree)


def save_official(params: Params, config: RecurrentGemmaConfig, path: str | Path) -> Path:
    """Write our params as an official Orbax checkpoint ({'params': tree}, as the official
    writer does); jax arrays stay jax arrays, so a sharded tree is written shard by shard."""
    import orbax.checkpoint as ocp

    check_tree(params, config)
    path = Path(path).absolute()
    tree = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else np.asarray(x), params)
    ocp.PyTreeCheckpointer().save(path, {"params": tree})
    return path
