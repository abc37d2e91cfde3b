"""The backbone contract: what every stage may ask of a decoder, whatever its family.

`Backbone` lists it; `posttrain.models.backbone` holds one implementation per family (Gemma 1 / 2,
RecurrentGemma) and the functions that pick one by the config's class. Every method takes the
model config first, a static (frozen, hashable) argument under jit.

A decoding state is opaque above `models/`: a pytree whose leaves are [b, ...] rows (a Gemma KV
cache; RecurrentGemma's Conv1D taps, RG-LRU state and attention window) besides scalar step
counters. `select_rows` and `repeat_rows` are the only ways to rearrange it.

Shape letters: b rows, t tokens, v vocabulary, d width (of the final hidden states), m branches
continuing one prompt, x prompt tokens.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
Params = dict[str, Any]
DecodeState = Any  # opaque: only the backbone's own functions look inside


class BackboneOutput(NamedTuple):
    """Float32 logits [b, t, v] (None unless asked for) and final normalised hidden states
    [b, t, d]."""

    logits: Array | None
    hidden: Array


class Backbone(abc.ABC):
    """One family's implementation of the interface; every method takes the config first."""

    config_class: type
    families: tuple[str, ...]  # values of the config's `family` field
    hf_model_types: tuple[str, ...]  # config.json `model_type`s this family reads
    # How a prompt shared by several branches is computed once (None: it is not). "branches":
    # one row holds the prefix and branches that see it but not each other (`branched_hidden`),
    # which attention masks allow; "fork": the prompt runs alone and its state seeds each branch
    # (`forked_hidden`), which a recurrence needs, its state reading every earlier token.
    prompt_sharing: Literal["branches", "fork"] | None = None

    @abc.abstractmethod
    def init_params(self, config: Any, rng: Array) -> Params:
        """Random parameters (a plain tree)."""

    @abc.abstractmethod
    def abstract_params(self, config: Any) -> Params:
        """Parameter shapes and dtypes, nothing allocated."""

    @abc.abstractmethod
    def param_logical_axes(self, config: Any) -> Params:
        """Logical axis names (PartitionSpecs) of every parameter leaf."""

    @abc.abstractmethod
    def width(self, config: Any) -> int:
        """d: the width of the final hidden states."""

    @abc.abstractmethod
    def apply(
        self,
        config: Any,
        params: Params,
        tokens: Array,
        positions: Array | None,
        segment_ids: Array | None,
        compute_logits: bool,
    ) -> BackboneOutput:
        """Whole rows [b, t]: segment id 0 is padding, positions count within each segment."""

    def branched_hidden(
        self,
        config: Any,
        params: Params,
        tokens: Array,
        positions: Array,
        segment_ids: Array,
        branch_ids: Array,
    ) -> Array:
        """Hidden states [b, t, d] of shared-prefix rows (`posttrain.data.shared_prompt`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot share a prefix between branches")

    def forked_hidden(
        self,
        config: Any,
        params: Params,
        prompt: Array,
        prompt_segments: Array,
        tokens: Array,
        positions: Array,
        segment_ids: Array,
    ) -> Array:
        """Hidden states [b, m, t, d] of m branches [b, m, t] continuing left-padded prompts
        [b, x], each prompt run once (`posttrain.data.shared_prompt.fork_prompts`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot fork a prompt's state")

    @abc.abstractmethod
    def unembedding(self, config: Any, params: Params) -> tuple[Array, float | None]:
        """(tied embedding [>= v, d], final logit soft cap): logits = cap(h @ E[:v].T)."""

    @abc.abstractmethod
    def logits_from_hidden(self, config: Any, params: Params, hidden: Array) -> Array:
        """Float32 logits [..., v] of hidden states [..., d]."""

    @abc.abstractmethod
    def prefill(
        self, config: Any, params: Params, tokens: Array, segment_ids: Array, max_length: int
    ) -> tuple[Array, DecodeState]:
        """Left-padded prompts [b, t] -> (logits [b, t, v], state continuing each row)."""

    @abc.abstractmethod
    def init_state(
        self, config: Any, batch: int, max_length: int, dtype: str | None = None
    ) -> DecodeState:
        """The state of rows that have seen nothing."""

    def decode_weights(self, config: Any, params: Params) -> Any:
        """What every decode step reuses, built once before a decode loop (None: nothing)."""
        return None

    @abc.abstractmethod
    def decode_step(
        self,
        config: Any,
        params: Params,
        tokens: Array,
        positions: Array,
        state: DecodeState,
        weights: Any = None,
    ) -> tuple[Array, DecodeState]:
        """One token per row (tokens, positions [b, 1]) -> (logits [b, 1, v], new state)."""

    def select_rows(self, config: Any, state: DecodeState, rows: Array) -> DecodeState:
        """A state whose row i is row `rows[i]` of this one."""
        # Every leaf but the scalar step counters is a [b, ...] row array.
        return jax.tree.map(lambda x: x if x.ndim == 0 else jnp.take(x, rows, axis=0), state)

    def repeat_rows(self, config: Any, state: DecodeState, repeats: int) -> DecodeState:
        """Each row `repeats` times in a row: [b, ...] -> [b * repeats, ...]."""
        if repeats == 1:
            return state
        return jax.tree.map(lambda x: x if x.ndim == 0 else jnp.repeat(x, repeats, axis=0), state)

    @abc.abstractmethod
    def config_from_hf(self, hf_config: dict[str, Any], dtype: str | None = None) -> Any:
        """The config of a transformers `config.json` dict."""

    @abc.abstractmethod
    def config_to_hf(self, config: Any, dtype: str) -> dict[str, Any]:
        """A transformers `config.json` dict."""

    @abc.abstractmethod
    def load_hf(self, directory: Path, dtype: str | None = None) -> tuple[Any, Params]:
        """(config, params) of a Hugging Face directory of this family."""

    @abc.abstractmethod
    def save_hf(self, config: Any, params: Params, directory: Path, dtype: str | None) -> Path:
        """Write `config.json` and `model.safetensors` that transformers loads."""

    @abc.abstractmethod
    def load_official(
        self, config: Any, path: Path, sharding: jax.sharding.Sharding | None = None
    ) -> tuple[Any, Params]:
        """(config, params) of an official Orbax checkpoint, which holds no config: `config`
        gives its shape, and the tree is checked against it before any array is read."""

    @abc.abstractmethod
    def save_official(self, config: Any, params: Params, path: Path, **options: Any) -> Path:
        """Write an official-layout Orbax checkpoint (`options`: the family's layout switches)."""
