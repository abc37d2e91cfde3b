"""WARM: weight-averaged reward models (Ramé et al. 2024; algorithms.md section 3).

Members fine-tuned from one shared initialisation (SFT backbone + one linear-probed head) are
averaged weight by weight, head included, in float32. Averaging only makes sense for members
with the same tree and tokenizer, so anything else is refused, naming the first difference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = Any


class IncompatibleMembersError(ValueError):
    """Members that cannot be averaged: different trees, shapes or tokenizers."""


def check_compatible(members: Sequence[Params], names: Sequence[str] | None = None) -> None:
    """Raise naming the first member and leaf whose structure, shape or dtype differs."""
    if len(members) < 1:
        raise IncompatibleMembersError("no members to average")
    names = list(names) if names is not None else [f"member {i}" for i in range(len(members))]
    reference = jax.tree_util.tree_flatten_with_path(members[0])[0]
    reference_paths = [jax.tree_util.keystr(path) for path, _ in reference]
    for name, member in zip(names[1:], members[1:], strict=True):
        leaves = jax.tree_util.tree_flatten_with_path(member)[0]
        paths = [jax.tree_util.keystr(path) for path, _ in leaves]
        if paths != reference_paths:
            differ = sorted(set(paths) ^ set(reference_paths))[:4]
            raise IncompatibleMembersError(
                f"{name}: parameter tree differs from {names[0]} (e.g. {differ})"
            )
        for path, (_, leaf), (_, ref) in zip(paths, leaves, reference, strict=True):
            if np.shape(leaf) != np.shape(ref) or jnp.result_type(leaf) != jnp.result_type(ref):
                raise IncompatibleMembersError(
                    f"{name}: {path} is {jnp.result_type(leaf)}{list(np.shape(leaf))}, "
                    f"{names[0]} has {jnp.result_type(ref)}{list(np.shape(ref))}"
                )


def average_weights(members: Sequence[Params], weights: Sequence[float] | None = None) -> Params:
    """The (weighted) average of member trees, accumulated in float32, cast back per leaf."""
    check_compatible(members)
    if weights is None:
        weights = [1.0 / len(members)] * len(members)
    if len(weights) != len(members) or min(weights) < 0 or not np.isclose(sum(weights), 1.0):
        raise ValueError(f"weights must be {len(members)} non-negative numbers summing to 1")

    def mean(*leaves: Any) -> Any:
        total = sum(
            w * jnp.asarray(leaf, jnp.float32) for w, leaf in zip(weights, leaves, strict=True)
        )
        return total.astype(jnp.result_type(leaves[0]))

    return jax.tree.map(mean, *members)


def interpolate(first: Params, second: Params, fraction: float) -> Params:
    """(1 - fraction)·first + fraction·second, the path that linear mode connectivity is about."""
    return average_weights([first, second], [1.0 - fraction, fraction])


def greedy_soup(
    members: Sequence[Params], held_out_accuracy: Callable[[Params], float]
) -> tuple[Params, list[int]]:
    """Members ranked by held-out accuracy; each joins the uniform soup only if the soup's
    accuracy does not drop. Returns the soup and the indices it holds, best first."""
    check_compatible(members)
    scores = [held_out_accuracy(member) for member in members]
    order = sorted(range(len(members)), key=lambda i: -scores[i])
    chosen = [order[0]]
    best = scores[order[0]]
    for index in order[1:]:
        candidate = average_weights([members[i] for i in [*chosen, index]])
        accuracy = held_out_accuracy(candidate)
        if accuracy >= best:
            chosen.append(index)
            best = accuracy
    return average_weights([members[i] for i in chosen]), chosen


def ensemble(scores: Sequence[Any]) -> np.ndarray:
    """The prediction ensemble: the mean of the members' rewards (WARM's baseline)."""
    return np.mean(np.stack([np.asarray(s, np.float32) for s in scores]), axis=0)
