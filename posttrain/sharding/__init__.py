"""Sharding: a (data, fsdp, tensor) mesh and logical-axis rules mapping names to mesh axes.

Parameters and activations carry logical names ("embed", "heads", "act_batch", ...); a rule
table turns them into `PartitionSpec`s for a given mesh. A dimension that a mesh axis does not
divide is left unsharded rather than failing, so e.g. a single-kv-head (MQA) model still runs
with tensor parallelism.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes, in priority order. Parameters: FSDP shards the model width, tensor
# parallelism the heads, MLP width and vocabulary. Activations: batch over data and fsdp.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": (),
    "norm": (),
    "act_batch": ("data", "fsdp"),
    "act_length": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; one of them may be -1 to take the remaining devices."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """Concrete axis sizes for `num_devices` devices."""
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {self}")
        known = math.prod(s for s in sizes if s != -1)
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh axis sizes must be positive or -1, got {self}")
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"{num_devices} devices do not divide into mesh {self}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"mesh {tuple(sizes)} needs {math.prod(sizes)} devices, have {num_devices}"
            )
        return tuple(sizes)  # type: ignore[return-value]


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = config.shape(len(devices))
    grid = np.asarray(devices, dtype=object).reshape(shape)
    # Auto axes: jit and the sharding constraints decide the layout (jax's default is Explicit).
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, Sequence[str]] = DEFAULT_RULES,
) -> PartitionSpec:
    """PartitionSpec for an array with these logical axis names and shape."""
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    spec: list[Any] = []
    for name, size in zip(names, shape, strict=True):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"no sharding rule for logical axis {name!r}")
        axes = [a for a in rules[name] if a in mesh.shape and a not in used and mesh.shape[a] > 1]
        # Drop trailing mesh axes until their product divides the dimension.
        while axes and size % math.prod(mesh.shape[a] for a in axes):
            axes.pop()
        used.update(axes)
        spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return PartitionSpec(*spec)


def tree_shardings(
    logical_axes: Any,
    shapes: Any,
    mesh: Mesh,
    rules: Mapping[str, Sequence[str]] = DEFAULT_RULES,
) -> Any:
    """NamedShardings for a tree of arrays (or shape structs) with a matching tree of names."""
    return jax.tree.map(
        lambda names, leaf: NamedSharding(
            mesh, logical_to_spec(tuple(names), leaf.shape, mesh, rules)
        ),
        logical_axes,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


_ACTIVE: contextvars.ContextVar[tuple[Mesh, Mapping[str, Sequence[str]]] | None] = (
    contextvars.ContextVar("posttrain_sharding", default=None)
)


@contextlib.contextmanager
def activation_sharding(
    mesh: Mesh, rules: Mapping[str, Sequence[str]] = DEFAULT_RULES
) -> Iterator[None]:
    """Within this context (while tracing), `constrain` pins activations to the mesh."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint from logical names; a no-op outside `activation_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(names, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def initialize_distributed(
    coordinator_address: str | None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Join a multi-host job when a coordinator is named; a no-op otherwise or if already joined."""
    if coordinator_address is None or jax.distributed.is_initialized():
        return
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def shard_params(params: Any, logical_axes: Any, mesh: Mesh) -> Any:
    """Place a parameter tree on the mesh by its logical axes."""
    return jax.device_put(params, tree_shardings(logical_axes, params, mesh))


def place_on_mesh(tree: Any, mesh: Mesh) -> Any:
    """Leaves not yet laid out on `mesh` (step counters, RNG) replicated over it.

    Otherwise the first call of a jitted step sees them on the default device and the second
    sees its own mesh-placed outputs: two compilations of the same step.
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def put(x: Any) -> Any:
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return x
        return jax.device_put(x, replicated)

    return jax.tree.map(put, tree)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place [b, ...] arrays with the batch axis over (data, fsdp), the rest replicated."""

    def put(x: Any) -> Any:
        names = ("act_batch",) + (None,) * (np.ndim(x) - 1)
        return jax.device_put(x, NamedSharding(mesh, logical_to_spec(names, np.shape(x), mesh)))

    return jax.tree.map(put, batch)
