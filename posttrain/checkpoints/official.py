"""Official Flax/Orbax checkpoints: `load_official` / `save_official` of any backbone family
(dispatched through `posttrain.models.backbone`, RecurrentGemma's format being
`posttrain.models.recurrentgemma.official`), the Orbax restore they share, and the Gemma
parameter tree (google-deepmind/gemma) itself.

A Gemma checkpoint is an Orbax PyTree whose keys are '/'-joined module paths
(`transformer/layer_0/attn/q_einsum` -> {'w': ...}). Our tree is the same graph without the
`transformer/` prefix, with the MLP weights as bare arrays and the gating weight always in the
[2, d, f] layout; Gemma 2 9B/27B store it as [2, f, d] (`transpose_gating_einsum`). Embedding
tables keep their 128 TPU padding rows (256128), recorded as `embed_padding`.

Loading reads into shape/dtype targets, not the saver's shardings, so a tree written from any
mesh loads on whatever devices this process has.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from posttrain.checkpoints.huggingface import CheckpointError
from posttrain.models.backbone import BackboneConfig, backbone_of
from posttrain.models.config import ModelConfig
from posttrain.models.transformer import abstract_params

Params = dict[str, Any]


def _nest(flat: dict[str, Any]) -> Params:
    """{'a/b': {'w': x}} -> {'a': {'b': {'w': x}}}."""
    tree: Params = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _flatten(tree: Params, prefix: str = "") -> dict[str, Any]:
    """Inverse of `_nest` down to dicts of arrays ({'a/b': {'w': x}})."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict) and any(isinstance(v, dict) for v in value.values()):
            flat.update(_flatten(value, path))
        else:
            flat[path] = value
    return flat


def params_from_official(tree: Params, config: ModelConfig) -> tuple[ModelConfig, Params]:
    """Convert an official tree (flat '/'-keyed or nested) into (config, our params).

    The returned config has `embed_padding` set from the checkpoint's embedding rows.
    """
    if any("/" in key for key in tree):
        tree = _nest(tree)
    tree = tree.get("transformer", tree)
    d, f = config.embed_dim, config.hidden_dim
    try:
        rows = np.shape(tree["embedder"]["input_embedding"])[0]
    except KeyError as error:
        raise CheckpointError(
            "official tree has no transformer/embedder/input_embedding"
        ) from error
    if rows < config.vocab_size:
        raise CheckpointError(
            f"embedder/input_embedding has {rows} rows, fewer than vocab_size={config.vocab_size}"
        )
    config = config.replace(embed_padding=rows - config.vocab_size)

    params: Params = {}
    for name, node in tree.items():
        if name.startswith("layer_") and "mlp" in node:
            mlp = {
                k: (v["w"] if isinstance(v, dict) and "w" in v else v)
                for k, v in node["mlp"].items()
            }
            gating = mlp.get("gating_einsum")
            # [2, f, d] is the transposed layout of Gemma 2 9B/27B; d == f would be ambiguous.
            if gating is not None and np.shape(gating) == (2, f, d) and d != f:
                mlp["gating_einsum"] = _swap_inner_axes(gating)
            node = {**node, "mlp": mlp}
        params[name] = node
    _check_tree(params, config)
    return config, params


def _as_array(x: Any) -> Any:
    """jax arrays as they are (possibly sharded), anything else as numpy."""
    return x if isinstance(x, jax.Array) else np.asarray(x)


def _swap_inner_axes(x: Any) -> Any:
    """[2, a, b] -> [2, b, a] for numpy arrays, jax arrays and shape structs alike."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((x.shape[0], x.shape[2], x.shape[1]), x.dtype)
    if isinstance(x, jax.Array):
        # Stays on the devices it is on: restored ones, or a sharded tree being saved.
        return jnp.swapaxes(x, 1, 2)
    return np.swapaxes(np.asarray(x), 1, 2)


def _check_tree(params: Params, config: ModelConfig) -> None:
    """Fail naming the first missing, unexpected or mis-shaped tensor."""
    expected = jax.tree_util.tree_flatten_with_path(abstract_params(config))[0]
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    expected_paths = {path for path, _ in expected}
    for path, leaf in expected:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        if path not in got:
            raise CheckpointError(f"official checkpoint is missing {name}")
        if tuple(np.shape(got[path])) != tuple(leaf.shape):
            raise CheckpointError(
                f"official tensor {name} has shape {tuple(np.shape(got[path]))}, "
                f"expected {tuple(leaf.shape)}"
            )
    for path in got:
        if path not in expected_paths:
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            raise CheckpointError(f"official checkpoint has unexpected tensor {name}")


def params_to_official(
    params: Params, config: ModelConfig, transpose_gating: bool = False
) -> dict[str, dict[str, Any]]:
    """Our params as the official flat tree ('transformer/...': {'w' | 'scale' | ...}).

    jax arrays stay jax arrays, so Orbax writes a sharded one shard by shard instead of
    gathering it (which a multi-host tree cannot do); anything else becomes numpy.
    """
    out: dict[str, dict[str, Any]] = {}
    for path, node in _flatten(jax.tree.map(_as_array, params)).items():
        key = f"transformer/{path}"
        if path.endswith("/mlp"):
            gating = node["gating_einsum"]
            if transpose_gating:
                gating = _swap_inner_axes(gating)
            out[f"{key}/gating_einsum"] = {"w": gating}
            out[f"{key}/linear"] = {"w": node["linear"]}
        else:
            out[key] = node
    return out


def restore_orbax_tree(
    path: str | Path,
    dtype: Any,
    sharding: jax.sharding.Sharding | None,
    check: Callable[[Any], object],
) -> Any:
    """Restore an Orbax PyTree with every array read as `dtype` onto `sharding` (default: this
    process's first device), whatever mesh wrote it, after `check` has passed the saved tree
    as shape/dtype structs: a wrong tree fails before any array is read. Never unpickles."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"official checkpoint {path} not found")
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(path).item_metadata
    if metadata is None:
        raise CheckpointError(f"official checkpoint {path} has no Orbax tree metadata")
    dtype = jnp.dtype(dtype)
    check(jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, dtype), metadata.tree))
    # Without targets Orbax looks for the saver's devices and fails on any other device set.
    # The target dtype makes it cast while reading: no float32 copy of a bfloat16 model.
    targets = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=sharding), metadata.tree
    )
    restore_args = ocp.checkpoint_utils.construct_restore_args(targets)
    return checkpointer.restore(
        path, args=ocp.args.PyTreeRestore(item=targets, restore_args=restore_args)
    )


def load_gemma_official(
    path: str | Path, config: ModelConfig, sharding: jax.sharding.Sharding | None = None
) -> tuple[ModelConfig, Params]:
    """Restore an official Gemma Orbax checkpoint for a model of `config`'s shape."""
    check = functools.partial(params_from_official, config=config)
    return params_from_official(
        restore_orbax_tree(path, config.param_dtype, sharding, check), config
    )


def save_gemma_official(
    params: Params, config: ModelConfig, path: str | Path, transpose_gating: bool = False
) -> Path:
    """Write our Gemma params as an official-layout Orbax checkpoint."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    ocp.PyTreeCheckpointer().save(path, params_to_official(params, config, transpose_gating))
    return path


def load_official(
    path: str | Path, config: BackboneConfig, sharding: jax.sharding.Sharding | None = None
) -> tuple[BackboneConfig, Params]:
    """Restore an official Orbax checkpoint (Gemma or RecurrentGemma, as `config` says) for a
    model of `config`'s shape.

    Every array is read as `config.param_dtype` onto `sharding` (default: this process's first
    device), whatever mesh wrote it; `posttrain.sharding.shard_params` lays it out further.
    """
    return backbone_of(config).load_official(config, Path(path), sharding)


def save_official(
    params: Params, config: BackboneConfig, path: str | Path, transpose_gating: bool = False
) -> Path:
    """Write our params as an official-layout Orbax checkpoint of `config`'s family
    (`transpose_gating`: Gemma 2 9B/27B's [2, f, d] MLP layout; Gemma only)."""
    options = {"transpose_gating": True} if transpose_gating else {}
    return backbone_of(config).save_official(config, params, Path(path), **options)
