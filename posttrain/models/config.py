"""Gemma 1 / Gemma 2 hyperparameters and the official presets.

Numbers are from the Gemma and Gemma 2 reports and the reference code (see
`shared/design/backbone.md` §1.1). The official Flax checkpoints carry 128 extra embedding rows
(TPU padding); `embed_padding` keeps them so that the published parameter counts and the
official trees match, while logits are only ever computed over the first `vocab_size` rows.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

AttentionType = Literal["local", "global"]
Family = Literal["gemma1", "gemma2"]

_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one Gemma 1 or Gemma 2 model.

    Shape letters used across the package: b batch, t query tokens, s key tokens, d embed_dim,
    n num_heads, k num_kv_heads, g = n / k query heads per kv head, h head_dim, f hidden_dim,
    v vocab_size, c cache slots.
    """

    family: Family
    num_layers: int
    embed_dim: int  # d
    num_heads: int  # n
    num_kv_heads: int  # k
    head_dim: int  # h
    hidden_dim: int  # f, per GeGLU branch
    vocab_size: int  # v: rows used for logits (the tokenizer's vocabulary)
    embed_padding: int = 0  # extra embedding rows of official checkpoints (128)
    query_pre_attn_scalar: float | None = None  # q is scaled by this**-0.5; None means head_dim
    sliding_window: int | None = None  # local layers attend to the last `sliding_window` keys
    attention_pattern: tuple[AttentionType, ...] = ("global",)  # cycled over the layers
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    use_post_norms: bool = False  # Gemma 2 normalises the attention and MLP outputs too
    rope_base: float = 10_000.0
    norm_eps: float = 1e-6
    dtype: str = "float32"  # activations
    param_dtype: str = "float32"
    remat: bool = False  # rematerialise each block in the backward pass

    def __post_init__(self) -> None:
        positive = ("num_layers", "embed_dim", "num_heads", "num_kv_heads", "head_dim")
        for name in (*positive, "hidden_dim", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.embed_padding < 0:
            raise ValueError(f"embed_padding must be >= 0, got {self.embed_padding}")
        if not self.attention_pattern or any(
            a not in ("local", "global") for a in self.attention_pattern
        ):
            raise ValueError(
                f"attention_pattern must be a non-empty sequence of 'local'/'global', "
                f"got {self.attention_pattern}"
            )
        if "local" in self.attention_pattern and not self.sliding_window:
            raise ValueError("local attention layers need a positive sliding_window")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"ModelConfig.{name} must be one of {_DTYPES}")
        if self.family not in ("gemma1", "gemma2"):
            raise ValueError(f"family must be 'gemma1' or 'gemma2', got {self.family!r}")

    @property
    def layer_types(self) -> tuple[AttentionType, ...]:
        """Attention type of every layer (Gemma 2: layer 0 local, then alternating)."""
        pattern = self.attention_pattern
        return tuple(pattern[i % len(pattern)] for i in range(self.num_layers))

    @property
    def query_scale(self) -> float:
        """Factor applied to queries after RoPE."""
        scalar = self.query_pre_attn_scalar or self.head_dim
        return float(scalar) ** -0.5

    @property
    def num_embed(self) -> int:
        """Rows of the embedding table, padding included."""
        return self.vocab_size + self.embed_padding

    def replace(self, **changes: object) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


_GEMMA2 = dict(
    family="gemma2",
    sliding_window=4096,
    attention_pattern=("local", "global"),
    attn_logit_softcap=50.0,
    final_logit_softcap=30.0,
    use_post_norms=True,
)

PRESETS: dict[str, ModelConfig] = {
    "gemma_2b": ModelConfig(
        family="gemma1",
        num_layers=18,
        embed_dim=2048,
        num_heads=8,
        num_kv_heads=1,
        head_dim=256,
        hidden_dim=16384,
        vocab_size=256_000,
        embed_padding=128,
    ),
    "gemma_7b": ModelConfig(
        family="gemma1",
        num_layers=28,
        embed_dim=3072,
        num_heads=16,
        num_kv_heads=16,
        head_dim=256,
        hidden_dim=24576,
        vocab_size=256_000,
        embed_padding=128,
    ),
    "gemma2_2b": ModelConfig(
        num_layers=26,
        embed_dim=2304,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        hidden_dim=9216,
        vocab_size=256_000,
        embed_padding=128,
        query_pre_attn_scalar=256,
        **_GEMMA2,
    ),
    "gemma2_9b": ModelConfig(
        num_layers=42,
        embed_dim=3584,
        num_heads=16,
        num_kv_heads=8,
        head_dim=256,
        hidden_dim=14336,
        vocab_size=256_000,
        embed_padding=128,
        # 256 (head_dim), not 224 = d/n: an early conversion used 224 (transformers#31891).
        query_pre_attn_scalar=256,
        **_GEMMA2,
    ),
    "gemma2_27b": ModelConfig(
        num_layers=46,
        embed_dim=4608,
        num_heads=32,
        num_kv_heads=16,
        head_dim=128,
        hidden_dim=36864,
        vocab_size=256_000,
        embed_padding=128,
        query_pre_attn_scalar=144,  # d / n, not head_dim
        **_GEMMA2,
    ),
    # Tiny shapes for tests and CPU runs; the Gemma 2 one is the benchmark shape of issue 2.
    "tiny_gemma1": ModelConfig(
        family="gemma1",
        num_layers=2,
        embed_dim=64,
        num_heads=4,
        num_kv_heads=1,
        head_dim=16,
        hidden_dim=128,
        vocab_size=512,
    ),
    "tiny_gemma2": ModelConfig(
        num_layers=4,
        embed_dim=64,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        hidden_dim=128,
        vocab_size=512,
        query_pre_attn_scalar=16,
        **{**_GEMMA2, "sliding_window": 8},
    ),
    "bench_gemma2_4l": ModelConfig(
        num_layers=4,
        embed_dim=256,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        hidden_dim=1024,
        vocab_size=1024,
        query_pre_attn_scalar=64,
        **{**_GEMMA2, "sliding_window": 64},
    ),
    # About 30M parameters: the CPU throughput shape.
    "bench_gemma2_30m": ModelConfig(
        num_layers=8,
        embed_dim=512,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        hidden_dim=1536,
        vocab_size=8192,
        query_pre_attn_scalar=64,
        **{**_GEMMA2, "sliding_window": 128},
    ),
}


def get_preset(name: str, **overrides: object) -> ModelConfig:
    """The named preset, optionally with some fields changed."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    config = PRESETS[name]
    return config.replace(**overrides) if overrides else config
