"""The backbone interface, one implementation per model family, chosen by the config.

Sampling, beam search, Best-of-N, reward models, log-probs, SFT and RL call a model only
through the functions below (the contract is `posttrain.models.interface.Backbone`). Each takes
the model config first, and the config's class picks the family's implementation
(`backbone_of`): Gemma 1 / 2 (`ModelConfig`) or RecurrentGemma (`RecurrentGemmaConfig`).
Configs are frozen and hashable and jitted callers pass them as static arguments, so the choice
is made once while tracing: a compiled graph holds only the family's own operations, exactly
what calling the family directly gives (the sampler's and beam search's Gemma graphs are the
ones they were before the interface).

Shape letters: b rows, t tokens, v vocabulary, d width (of the final hidden states), m branches
continuing one prompt, x prompt tokens.
"""

from __future__ import annotations

import functools
from typing import Any

import jax

from posttrain.models import cache as gemma_cache
from posttrain.models import transformer as gemma
from posttrain.models.config import PRESETS as GEMMA_PRESETS
from posttrain.models.config import ModelConfig
from posttrain.models.interface import Array, Backbone, BackboneOutput, DecodeState, Params
from posttrain.models.recurrentgemma import model as griffin
from posttrain.models.recurrentgemma.config import PRESETS as RECURRENT_PRESETS
from posttrain.models.recurrentgemma.config import RecurrentGemmaConfig

BackboneConfig = ModelConfig | RecurrentGemmaConfig

# Every preset of every family, by name (the `model=` config group).
PRESETS: dict[str, BackboneConfig] = {**GEMMA_PRESETS, **RECURRENT_PRESETS}


class _GemmaBackbone(Backbone):
    """Gemma 1 and Gemma 2: the transformer of `posttrain.models.transformer`."""

    config_class = ModelConfig
    families = ("gemma1", "gemma2")
    hf_model_types = ("gemma", "gemma2")
    prompt_sharing = "branches"

    def init_params(self, config, rng):
        return gemma.init_params(config, rng)

    def abstract_params(self, config):
        return gemma.abstract_params(config)

    def param_logical_axes(self, config):
        return gemma.param_logical_axes(config)

    def width(self, config):
        return config.embed_dim

    def apply(self, config, params, tokens, positions, segment_ids, compute_logits):
        out = gemma.Transformer(config).apply(
            {"params": params}, tokens, positions, segment_ids, compute_logits=compute_logits
        )
        return BackboneOutput(out.logits, out.hidden)

    def branched_hidden(self, config, params, tokens, positions, segment_ids, branch_ids):
        out = gemma.Transformer(config).apply(
            {"params": params},
            tokens,
            positions,
            segment_ids,
            compute_logits=False,
            branch_ids=branch_ids,
            # Each branch's positions continue the prefix's, within the row.
            position_bound=tokens.shape[1],
        )
        return out.hidden

    def unembedding(self, config, params):
        return params["embedder"]["input_embedding"], config.final_logit_softcap

    def logits_from_hidden(self, config, params, hidden):
        return gemma.logits_from_hidden(config, params, hidden)

    def prefill(self, config, params, tokens, segment_ids, max_length):
        return gemma.prefill(config, params, tokens, segment_ids, max_length)

    def init_state(self, config, batch, max_length, dtype=None):
        return gemma_cache.init_cache(config, batch, max_length, dtype)

    def decode_weights(self, config, params):
        return gemma.decode_weights(config, params)

    def decode_step(self, config, params, tokens, positions, state, weights=None):
        # Positions stay below a row's token count, which the cache holds: RoPE may read its
        # sines from a table of cache-size entries (a position past it reads NaN, never junk).
        bound = state.global_positions.shape[1]
        return gemma.decode_step(
            config, params, tokens, positions, state, weights, position_bound=bound
        )

    def config_from_hf(self, hf_config, dtype=None):
        from posttrain.checkpoints import huggingface

        return huggingface.gemma_config_from_hf(hf_config, dtype)

    def config_to_hf(self, config, dtype):
        from posttrain.checkpoints import huggingface

        return huggingface.gemma_config_to_hf(config, dtype)

    def load_hf(self, directory, dtype=None):
        from posttrain.checkpoints import huggingface

        return huggingface.load_gemma_hf(directory, dtype)

    def save_hf(self, config, params, directory, dtype):
        from posttrain.checkpoints import huggingface

        return huggingface.save_gemma_hf(config, params, directory, dtype)

    def load_official(self, config, path, sharding=None):
        from posttrain.checkpoints import official

        return official.load_gemma_official(path, config, sharding)

    def save_official(self, config, params, path, **options):
        from posttrain.checkpoints import official

        return official.save_gemma_official(params, config, path, **options)


class _RecurrentGemmaBackbone(Backbone):
    """RecurrentGemma (Griffin): `posttrain.models.recurrentgemma`.

    Its state is O(1) per row, so `max_length` sizes nothing. A shared prompt forks: a recurrence
    cannot restart a branch from the prefix's state within one row, but a branch can start from
    the state the prompt's own pass ends in."""

    config_class = RecurrentGemmaConfig
    families = ("recurrentgemma",)
    hf_model_types = ("recurrent_gemma",)
    prompt_sharing = "fork"

    def init_params(self, config, rng):
        return griffin.init_params(config, rng)

    def abstract_params(self, config):
        return griffin.abstract_params(config)

    def param_logical_axes(self, config):
        return griffin.param_logical_axes(config)

    def width(self, config):
        return config.width

    def apply(self, config, params, tokens, positions, segment_ids, compute_logits):
        out = griffin.RecurrentGemma(config).apply(
            {"params": params}, tokens, positions, segment_ids, compute_logits=compute_logits
        )
        return BackboneOutput(out.logits, out.hidden)

    def forked_hidden(
        self, config, params, prompt, prompt_segments, tokens, positions, segment_ids
    ):
        return griffin.forked_hidden(
            config, params, prompt, prompt_segments, tokens, positions, segment_ids
        )

    def unembedding(self, config, params):
        return params["embedder"]["input_embedding"], config.logit_softcap

    def logits_from_hidden(self, config, params, hidden):
        return griffin.logits_from_hidden(config, params, hidden)

    def prefill(self, config, params, tokens, segment_ids, max_length):
        return griffin.prefill(config, params, tokens, None, segment_ids)

    def init_state(self, config, batch, max_length, dtype=None):
        return griffin.init_state(config, batch, dtype)

    def decode_step(self, config, params, tokens, positions, state, weights=None):
        return griffin.decode_step(config, params, tokens, positions, state)

    def config_from_hf(self, hf_config, dtype=None):
        from posttrain.models.recurrentgemma import huggingface

        return huggingface.config_from_hf(hf_config, dtype=dtype)

    def config_to_hf(self, config, dtype):
        from posttrain.models.recurrentgemma import huggingface

        return huggingface.config_to_hf(config, dtype)

    def load_hf(self, directory, dtype=None):
        from posttrain.models.recurrentgemma import huggingface

        return huggingface.load_hf(directory, dtype=dtype)

    def save_hf(self, config, params, directory, dtype):
        from posttrain.models.recurrentgemma import huggingface

        return huggingface.save_hf(config, params, directory, dtype)

    def load_official(self, config, path, sharding=None):
        from posttrain.models.recurrentgemma import official

        return official.load_official(path, config, sharding)

    def save_official(self, config, params, path, **options):
        from posttrain.models.recurrentgemma import official

        if options:
            raise TypeError(f"RecurrentGemma's official layout has no options {sorted(options)}")
        return official.save_official(params, config, path)


BACKBONES: tuple[Backbone, ...] = (_GemmaBackbone(), _RecurrentGemmaBackbone())


def backbone_of(config: BackboneConfig) -> Backbone:
    """The implementation for this config's family (chosen by its class)."""
    for backbone in BACKBONES:
        if isinstance(config, backbone.config_class):
            return backbone
    raise TypeError(f"no backbone for a {type(config).__name__}: {config!r}")


def backbone_for_family(family: str) -> Backbone:
    """The implementation whose configs have this `family` field."""
    for backbone in BACKBONES:
        if family in backbone.families:
            return backbone
    known = sorted(f for b in BACKBONES for f in b.families)
    raise ValueError(f"unknown model family {family!r}; known: {known}")


def backbone_for_hf(model_type: str | None) -> Backbone:
    """The implementation that reads a config.json of this `model_type`."""
    for backbone in BACKBONES:
        if model_type in backbone.hf_model_types:
            return backbone
    known = sorted(t for b in BACKBONES for t in b.hf_model_types)
    raise ValueError(
        f"config.json model_type={model_type!r} is not supported; expected one of {known}"
    )


def get_preset(name: str, **overrides: object) -> BackboneConfig:
    """The named preset of any family, optionally with some fields changed."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    config = PRESETS[name]
    return config.replace(**overrides) if overrides else config


# -- parameters -----------------------------------------------------------------------------
def init_params(config: BackboneConfig, rng: Array) -> Params:
    """Random parameters (plain arrays, logical annotations stripped)."""
    return backbone_of(config).init_params(config, rng)


def abstract_params(config: BackboneConfig) -> Params:
    """Parameter shapes and dtypes without allocating anything."""
    return backbone_of(config).abstract_params(config)


def param_logical_axes(config: BackboneConfig) -> Params:
    """Tree of logical axis names (PartitionSpec of names) matching the parameter tree."""
    return backbone_of(config).param_logical_axes(config)


def width(config: BackboneConfig) -> int:
    """d: the width of the final hidden states (a reward head's input)."""
    return backbone_of(config).width(config)


# -- whole rows -----------------------------------------------------------------------------
def apply(
    config: BackboneConfig,
    params: Params,
    tokens: Array,
    positions: Array | None = None,
    segment_ids: Array | None = None,
    compute_logits: bool = True,
) -> BackboneOutput:
    """Logits (unless `compute_logits` is False) and hidden states of rows [b, t]."""
    return backbone_of(config).apply(config, params, tokens, positions, segment_ids, compute_logits)


def forward(
    config: BackboneConfig,
    params: Params,
    tokens: Array,
    positions: Array | None = None,
    segment_ids: Array | None = None,
) -> Array:
    """Float32 logits [b, t, v] of whole rows; concrete out-of-range ids raise."""
    # A traced array is skipped: the guard adds nothing to a compiled graph.
    gemma.check_token_ids(tokens, config.vocab_size, "forward")
    return apply(config, params, tokens, positions, segment_ids).logits


def hidden_states(
    config: BackboneConfig,
    params: Params,
    tokens: Array,
    positions: Array | None = None,
    segment_ids: Array | None = None,
) -> Array:
    """Final normalised hidden states [b, t, d] (no vocabulary projection)."""
    return apply(config, params, tokens, positions, segment_ids, compute_logits=False).hidden


def prompt_sharing(config: BackboneConfig) -> str | None:
    """How: "branches" (`branched_hidden`), "fork" (`forked_hidden`), or None (not at all)."""
    return backbone_of(config).prompt_sharing


def branched_hidden(
    config: BackboneConfig,
    params: Params,
    tokens: Array,
    positions: Array,
    segment_ids: Array,
    branch_ids: Array,
) -> Array:
    """Hidden states [b, t, d] of rows holding a shared prefix and branches continuing it."""
    return backbone_of(config).branched_hidden(
        config, params, tokens, positions, segment_ids, branch_ids
    )


def forked_hidden(
    config: BackboneConfig,
    params: Params,
    prompt: Array,
    prompt_segments: Array,
    tokens: Array,
    positions: Array,
    segment_ids: Array,
) -> Array:
    """Hidden states [b, m, t, d] of m branches [b, m, t] continuing left-padded prompts [b, x]
    (segment 0 = padding; branch positions follow the prompt's), each prompt run once."""
    return backbone_of(config).forked_hidden(
        config, params, prompt, prompt_segments, tokens, positions, segment_ids
    )


def unembedding(config: BackboneConfig, params: Params) -> tuple[Array, float | None]:
    """(tied embedding [>= v, d], final soft cap): lets losses chunk the vocabulary."""
    return backbone_of(config).unembedding(config, params)


def logits_from_hidden(config: BackboneConfig, params: Params, hidden: Array) -> Array:
    """Float32 logits [..., v] of hidden states [..., d]."""
    return backbone_of(config).logits_from_hidden(config, params, hidden)


# -- decoding -------------------------------------------------------------------------------
def prefill(
    config: BackboneConfig,
    params: Params,
    tokens: Array,
    segment_ids: Array,
    max_length: int,
) -> tuple[Array, DecodeState]:
    """Run left-padded prompts [b, t] (segment 0 = padding) and return their logits [b, t, v]
    and the state that decodes on from each row, for rows of up to `max_length` tokens."""
    return backbone_of(config).prefill(config, params, tokens, segment_ids, max_length)


def init_state(
    config: BackboneConfig, batch: int, max_length: int, dtype: str | None = None
) -> DecodeState:
    """The decoding state of `batch` empty rows of up to `max_length` tokens."""
    return backbone_of(config).init_state(config, batch, max_length, dtype)


def abstract_state(
    config: BackboneConfig, batch: int, max_length: int, dtype: str | None = None
) -> DecodeState:
    """Shapes and dtypes of `init_state`'s state, nothing allocated."""
    return jax.eval_shape(functools.partial(init_state, config, batch, max_length, dtype))


def decode_weights(config: BackboneConfig, params: Params) -> Any:
    """What each decode step reuses; build it once before a decode loop and pass it to
    `decode_step` (Gemma: the projections laid out for one-token matmuls)."""
    return backbone_of(config).decode_weights(config, params)


def decode_step(
    config: BackboneConfig,
    params: Params,
    tokens: Array,
    positions: Array,
    state: DecodeState,
    weights: Any = None,
) -> tuple[Array, DecodeState]:
    """Feed one token per row (tokens, positions [b, 1]; positions below the prefill's
    `max_length`) and return logits [b, 1, v] and the new state."""
    return backbone_of(config).decode_step(config, params, tokens, positions, state, weights)


def select_rows(config: BackboneConfig, state: DecodeState, rows: Array) -> DecodeState:
    """A state whose row i is row `rows[i]` of this one (beam reordering, replication)."""
    return backbone_of(config).select_rows(config, state, rows)


def repeat_rows(config: BackboneConfig, state: DecodeState, repeats: int) -> DecodeState:
    """Each row `repeats` times in a row ([b, ...] -> [b * repeats, ...]): k samples of one
    prompt continue from one prefill."""
    return backbone_of(config).repeat_rows(config, state, repeats)
