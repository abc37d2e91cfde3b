"""Per-device memory estimate of a run from abstract shapes, checked before anything is allocated.

A run that cannot fit should say so in a second, not be OOM-killed after the parameters are
built. `estimate_training_memory` adds up, per device:

* parameters (trainable), sharded by their logical axes and the mesh rules (`posttrain.sharding`),
  exactly as `shard_params` lays them out;
* gradients: one copy in the parameter dtype; with gradient accumulation (micro_batches > 1) also
  the float32 accumulator of `train.step.accumulated_gradients` (with one micro-batch XLA folds the
  one-trip loop and the zero accumulator away);
* optimizer state: the exact tree of `jax.eval_shape(optimizer.init, params)`; a leaf with the
  shape of the parameter at the end of its path is sharded like it (optax builds moments with
  `zeros_like`), other leaves (step counts, Adafactor's factored rows and columns) replicated;
* frozen trees (reference, anchor, reward model), sharded the same way;
* activations of one micro-batch, divided over the devices that split the batch, by the rough
  model of `activation_bytes`, and the vocabulary-chunked cross-entropy's logits;
* an optional decoding state (`kv_cache_bytes`: a Gemma KV cache, RecurrentGemma's O(1) state).

XLA's own workspace, temporaries of the optimizer update and fragmentation are not modelled;
`check_fits` leaves a margin for them (`MEMORY_MARGIN`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from posttrain.models import backbone
from posttrain.models.attention import local_block
from posttrain.models.backbone import BackboneConfig, abstract_params, param_logical_axes
from posttrain.models.config import ModelConfig
from posttrain.models.recurrentgemma import RecurrentGemmaConfig
from posttrain.models.recurrentgemma.attention import band_block
from posttrain.sharding import DEFAULT_RULES, MESH_AXES, MeshConfig, logical_to_spec

GIB = 2**30
# A run is refused when its estimate exceeds this fraction of the available memory: the rest is
# for what the estimate leaves out (XLA workspace and temporaries, fragmentation, the runtime).
MEMORY_MARGIN = 0.9
FORCE_FLAG = "force_memory=true"

_log = logging.getLogger(__name__)

# A frozen tree: (name, abstract tree) or (name, abstract tree, its logical axes).
FrozenTree = tuple[str, Any] | tuple[str, Any, Any]


class InsufficientMemoryError(MemoryError):
    """The estimated per-device memory of a run exceeds what the device has."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Estimated bytes per device, by part."""

    parameters: int  # trainable parameters
    gradients: int
    optimizer: int
    activations: int  # saved for the backward pass, one micro-batch
    logits: int  # the vocabulary chunk of the cross-entropy and its gradient
    kv_cache: int = 0  # decoding cache of rollouts
    frozen: tuple[tuple[str, int], ...] = ()  # (name, bytes) of each frozen tree
    sharding: str = ""  # how the parts were divided over the mesh

    def parts(self) -> list[tuple[str, int]]:
        """(name, bytes) of every part, frozen trees included, in a fixed order."""
        return [
            ("parameters", self.parameters),
            ("gradients", self.gradients),
            ("optimizer state", self.optimizer),
            *((f"frozen {name}", size) for name, size in self.frozen),
            ("activations", self.activations),
            ("logits", self.logits),
            ("kv cache", self.kv_cache),
        ]

    @property
    def total(self) -> int:
        """Sum of all parts, bytes per device."""
        return sum(size for _, size in self.parts())

    def largest(self, count: int = 3) -> list[tuple[str, int]]:
        """The `count` largest non-empty parts, largest first."""
        ranked = sorted((p for p in self.parts() if p[1] > 0), key=lambda p: -p[1])
        return ranked[:count]

    def table(self) -> str:
        """One line per part in GiB, then the total and how the parts were sharded."""
        width = max(len(name) for name, _ in self.parts())
        lines = [f"{name:<{width}}  {size / GIB:8.2f} GiB" for name, size in self.parts()]
        lines.append(f"{'total':<{width}}  {self.total / GIB:8.2f} GiB per device")
        if self.sharding:
            lines.append(self.sharding)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def resolve_mesh(
    mesh: MeshConfig | Mesh | AbstractMesh | None, num_devices: int | None = None
) -> AbstractMesh:
    """The (data, fsdp, tensor) mesh shape to estimate for; a MeshConfig over `num_devices`
    (default: every device), None for one device."""
    if mesh is None:
        return AbstractMesh((1, 1, 1), MESH_AXES)
    if isinstance(mesh, MeshConfig):
        sizes = mesh.shape(num_devices if num_devices is not None else jax.device_count())
        return AbstractMesh(sizes, MESH_AXES)
    if isinstance(mesh, Mesh):
        return mesh.abstract_mesh
    return mesh


def sharded_bytes(
    leaf: Any,
    names: Sequence[str | None] | None,
    mesh: AbstractMesh,
    rules: Mapping[str, Sequence[str]] = DEFAULT_RULES,
) -> int:
    """Bytes one device holds of an array (or shape struct) with these logical axes; no names
    means replicated."""
    shape = tuple(leaf.shape)
    elements = math.prod(shape)
    if names is not None:
        spec = logical_to_spec(tuple(names), shape, mesh, rules)
        for size, axes in zip(shape, spec, strict=True):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else axes
            # logical_to_spec only picks mesh axes that divide the dimension: exact division.
            elements = elements // size * (size // math.prod(mesh.shape[a] for a in axes))
    return elements * jnp.dtype(leaf.dtype).itemsize


def _path_key(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _leaf_axes(params: Any, logical_axes: Any) -> dict[tuple[str, ...], tuple[Any, tuple]]:
    """Parameter path -> (shape, logical names)."""
    axes = jax.tree.leaves(logical_axes, is_leaf=lambda x: isinstance(x, PartitionSpec))
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if len(axes) != len(leaves):
        raise ValueError(f"{len(axes)} logical axes for {len(leaves)} parameters")
    return {
        _path_key(path): (tuple(leaf.shape), tuple(names))
        for (path, leaf), names in zip(leaves, axes, strict=True)
    }


def tree_bytes_per_device(
    tree: Any,
    param_axes: Mapping[tuple[str, ...], tuple[Any, tuple]],
    mesh: AbstractMesh,
    rules: Mapping[str, Sequence[str]] = DEFAULT_RULES,
) -> int:
    """Per-device bytes of a tree whose leaves are sharded like the parameter that ends their
    path and has their shape (optimizer moments, a reference policy); others replicated."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = _path_key(path)
        names = None
        for start in range(len(key)):
            match = param_axes.get(key[start:])
            if match is not None and match[0] == tuple(leaf.shape):
                names = match[1]
                break
        total += sharded_bytes(leaf, names, mesh, rules)
    return total


def tree_bytes(tree: Any) -> int:
    """Total bytes of every leaf of a tree of arrays or shape structs."""
    return sum(
        math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)
    )


def batch_rows_per_device(batch: int, mesh: AbstractMesh) -> int:
    """Rows of a [batch, ...] array on one device when the batch is laid out as `shard_batch`
    does (over data x fsdp, left whole where they do not divide it)."""
    return sharded_bytes(jax.ShapeDtypeStruct((batch,), "int8"), ("act_batch",), mesh)


def activation_bytes(config: BackboneConfig, rows: int, length: int) -> int:
    """Bytes saved for the backward pass by `rows` sequences of `length` tokens (a rough model
    of the config's family)."""
    if isinstance(config, ModelConfig):
        return _transformer_activation_bytes(config, rows, length)
    return _recurrent_activation_bytes(config, rows, length)


def _transformer_activation_bytes(config: ModelConfig, rows: int, length: int) -> int:
    """Gemma's activations (see `activation_bytes`).

    Per layer and token, in the activation dtype: the residual-width tensors (block input, both
    norm outputs, both sub-layer outputs and the mid residual, plus Gemma 2's two post-norm
    outputs), queries, keys, values and the attention output ((2n + 2k) h), and the MLP's gate,
    up and product (3f); in float32, the attention probabilities over the keys each query scores
    (n x s: all t for global layers and short rows, a band of 2 x block for blocked local
    layers), twice with a soft cap (tanh is kept). With `remat` only each block's input (d) is
    kept, plus one layer's full set while it is recomputed; this assumes the scheduler keeps each
    recomputation next to its use, as the GPU and TPU schedulers do (XLA:CPU may hoist them all,
    and then remat saves little). On top of either: one layer's backward working set (four
    float32 score tensors: the probabilities' gradient, the logits' gradient and the transposed
    copies of both products' operands; the MLP intermediates' gradients, 3f) and two
    residual-width gradients live throughout the backward pass.
    """
    item = jnp.dtype(config.dtype).itemsize
    d, n, k, h, f = (
        config.embed_dim,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.hidden_dim,
    )
    residuals = 8 if config.use_post_norms else 6
    dense = (residuals * d + (2 * n + 2 * k) * h + 3 * f) * item
    score_copies = 2 if config.attn_logit_softcap is not None else 1

    def scored_keys(attn_type: str) -> int:
        window = config.sliding_window if attn_type == "local" else None
        block = local_block(window, length, None)
        return length if block is None else 2 * block

    keys = [scored_keys(a) for a in config.layer_types]
    per_layer = [dense + n * s * 4 * score_copies for s in keys]
    remat_saved = config.num_layers * d * item + max(per_layer)
    saved = remat_saved if config.remat else sum(per_layer)
    backward = n * max(keys) * 4 * 4 + 3 * f * item + 2 * d * item
    return rows * length * (saved + backward)


def _recurrent_activation_bytes(config: RecurrentGemmaConfig, rows: int, length: int) -> int:
    """RecurrentGemma's activations, as `_transformer_activation_bytes` counts Gemma's.

    Per layer and token, in the activation dtype: six residual-width tensors and the MLP's gate,
    up and product (3f), plus for a recurrent block y, gelu(y), x and the Conv1D output (4l) and
    in float32 both gates, a, the scaled input, the state and the gated output (6l) and the
    associative scan's saved levels (about 4l); for an attention block q, k, v, their rotated
    copies and the output ((3d + 3h)) and the float32 probabilities over the keys a query
    scores (n x s: a band of 2 x block, or the row). Remat and the backward working set as there.
    """
    item = jnp.dtype(config.dtype).itemsize
    d, lw, f = config.width, config.lru_width, config.mlp_width
    n, h = config.num_heads, config.head_dim
    block = band_block(config.visible_keys, length)
    keys = length if block is None else 2 * block
    common = (6 * d + 3 * f) * item
    per_kind = {
        "recurrent": common + 4 * lw * item + 10 * lw * 4,
        "attention": common + (3 * d + 3 * h) * item + n * keys * 4,
    }
    per_layer = [per_kind[kind] for kind in config.block_types]
    remat_saved = config.num_layers * d * item + max(per_layer)
    saved = remat_saved if config.remat else sum(per_layer)
    backward = n * keys * 4 * 4 + 3 * f * item + 2 * d * item
    return rows * length * (saved + backward)


def logits_bytes(config: BackboneConfig, rows: int, length: int, chunk_size: int) -> int:
    """Bytes of the chunked cross-entropy: one chunk's float32 logits, their exponentials and
    gradient ([tokens, chunk] each), plus the scan's saved running statistics (3 per chunk)."""
    tokens = rows * length
    chunk = min(chunk_size, config.vocab_size)
    chunks = -(-config.vocab_size // chunk)
    return tokens * (3 * chunk + 3 * chunks) * 4


def kv_cache_bytes(
    config: BackboneConfig, batch: int, cache_size: int, dtype: str | None = None
) -> int:
    """Bytes of the backbone's decoding state for `batch` rows of up to `cache_size` tokens
    (`backbone.init_state`): Gemma's keys and values per layer (local layers keep only their
    window) with the slot positions, or RecurrentGemma's fixed-size state."""
    return tree_bytes(backbone.abstract_state(config, batch, cache_size, dtype))


@functools.cache
def _policy_shapes(config: BackboneConfig) -> tuple[Any, dict[tuple[str, ...], tuple[Any, tuple]]]:
    # Tracing a 2B model's init takes about a second; the shapes of a config never change.
    params = abstract_params(config)
    return params, _leaf_axes(params, param_logical_axes(config))


def estimate_training_memory(
    config: BackboneConfig,
    optimizer: optax.GradientTransformation,
    batch_size: int,
    length: int,
    mesh: MeshConfig | Mesh | AbstractMesh | None = None,
    *,
    num_devices: int | None = None,
    micro_batches: int = 1,
    chunk_size: int = 8192,
    frozen: Sequence[FrozenTree] = (),
    rollout_batch: int = 0,
    cache_size: int = 0,
    rules: Mapping[str, Sequence[str]] = DEFAULT_RULES,
) -> MemoryEstimate:
    """Per-device memory of training `config` with `optimizer` on batches of `batch_size` rows of
    `length` tokens, from abstract shapes only (nothing is allocated).

    `mesh` is a MeshConfig (over `num_devices`, default every device), a mesh, or None for one
    device. `frozen` lists (name, abstract tree[, logical axes]) of trees held but not trained.
    `rollout_batch` > 0 adds a decoding cache of `cache_size` slots for that many rows.
    """
    if batch_size <= 0 or length <= 0:
        raise ValueError(f"batch_size={batch_size} and length={length} must be positive")
    if micro_batches <= 0 or batch_size % micro_batches:
        raise ValueError(f"batch of {batch_size} rows does not split into {micro_batches}")
    shape = resolve_mesh(mesh, num_devices)
    params, axes = _policy_shapes(config)
    parameters = tree_bytes_per_device(params, axes, shape, rules)
    gradients = parameters
    if micro_batches > 1:
        accumulator = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, "float32"), params)
        gradients += tree_bytes_per_device(accumulator, axes, shape, rules)
    opt_state = jax.eval_shape(optimizer.init, params)
    frozen_bytes = []
    for entry in frozen:
        name, tree = entry[0], entry[1]
        tree_axes = _leaf_axes(tree, entry[2]) if len(entry) > 2 else axes
        frozen_bytes.append((name, tree_bytes_per_device(tree, tree_axes, shape, rules)))
    rows = -(-batch_rows_per_device(batch_size, shape) // micro_batches)
    kv_cache = 0
    if rollout_batch:
        kv_cache = kv_cache_bytes(config, batch_rows_per_device(rollout_batch, shape), cache_size)
    sizes = " ".join(f"{a}={s}" for a, s in shape.shape.items())
    return MemoryEstimate(
        parameters=parameters,
        gradients=gradients,
        optimizer=tree_bytes_per_device(opt_state, axes, shape, rules),
        activations=activation_bytes(config, rows, length),
        logits=logits_bytes(config, rows, length, chunk_size),
        kv_cache=kv_cache,
        frozen=tuple(frozen_bytes),
        sharding=(
            f"mesh {sizes}: parameters, gradients, optimizer state and frozen trees by their "
            f"logical axes; activations and cache over the batch (rows per device per "
            f"micro-batch: {rows}, remat={config.remat})"
        ),
    )


def estimate_inference_memory(
    config: BackboneConfig,
    batch_size: int,
    cache_size: int,
    mesh: MeshConfig | Mesh | AbstractMesh | None = None,
    *,
    frozen: Sequence[FrozenTree] = (),
    rules: Mapping[str, Sequence[str]] = DEFAULT_RULES,
) -> MemoryEstimate:
    """Per-device memory of decoding `batch_size` rows with a cache of `cache_size` slots:
    the parameters, `frozen` trees (e.g. a reference for KL), the cache and one step's logits."""
    if batch_size <= 0 or cache_size <= 0:
        raise ValueError(f"batch_size={batch_size} and cache_size={cache_size} must be positive")
    shape = resolve_mesh(mesh)
    params, axes = _policy_shapes(config)
    frozen_bytes = tuple(
        (entry[0], tree_bytes_per_device(entry[1], axes, shape, rules)) for entry in frozen
    )
    rows = batch_rows_per_device(batch_size, shape)
    sizes = " ".join(f"{a}={s}" for a, s in shape.shape.items())
    return MemoryEstimate(
        parameters=tree_bytes_per_device(params, axes, shape, rules),
        gradients=0,
        optimizer=0,
        activations=0,
        logits=rows * config.vocab_size * 4,
        kv_cache=kv_cache_bytes(config, rows, cache_size),
        frozen=frozen_bytes,
        sharding=f"mesh {sizes}: parameters by their logical axes; cache over the batch "
        f"(rows per device: {rows})",
    )


def _host_available_bytes() -> tuple[int, str]:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "host MemAvailable"
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return pages, "host free physical pages"


def available_memory_bytes(
    device: jax.Device | None = None, devices_in_use: int | None = None
) -> tuple[int, str]:
    """(bytes one device can still use, where the figure came from).

    An accelerator reports its own limit minus what is in use. CPU devices share the host's RAM:
    its available memory is divided among `devices_in_use` of them (default: every local CPU
    device, as a mesh over all simulated devices uses them all).
    """
    device = device if device is not None else jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            limit, in_use = stats["bytes_limit"], stats.get("bytes_in_use", 0)
            source = (
                f"{device.device_kind} bytes_limit {limit / GIB:.1f} GiB minus "
                f"{in_use / GIB:.1f} GiB in use"
            )
            return limit - in_use, source
    host, source = _host_available_bytes()
    if device.platform != "cpu":
        # No memory statistics from this backend: the host's RAM is the only figure there is.
        return host, f"{source} {host / GIB:.1f} GiB ({device.platform} reports no memory stats)"
    sharing = devices_in_use or len(jax.local_devices(backend="cpu"))
    plural = "device" if sharing == 1 else "devices"
    return host // sharing, f"{source} {host / GIB:.1f} GiB shared by {sharing} CPU {plural}"


def check_fits(
    estimate: MemoryEstimate, available: tuple[int, str], what: str, force: bool = False
) -> None:
    """Raise InsufficientMemoryError when `estimate.total` exceeds MEMORY_MARGIN of the
    available (bytes, source); with `force`, log a warning instead."""
    limit_bytes, source = available
    allowed = MEMORY_MARGIN * limit_bytes
    if estimate.total <= allowed:
        return
    parts = ", ".join(f"{name} {size / GIB:.2f}" for name, size in estimate.largest())
    message = (
        f"{what} needs an estimated {estimate.total / GIB:.2f} GiB per device ({parts} GiB), "
        f"more than {MEMORY_MARGIN:.0%} of the {limit_bytes / GIB:.2f} GiB available "
        f"({source}). Shard over more devices (mesh=fsdp), set model.remat=true, use a smaller "
        f"batch or optim=adafactor, or pass {FORCE_FLAG} to run anyway.\n{estimate.table()}"
    )
    if force:
        _log.warning("%s: running anyway (%s)", message, FORCE_FLAG)
        return
    raise InsufficientMemoryError(message)
