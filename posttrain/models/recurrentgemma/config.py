"""RecurrentGemma (Griffin) hyperparameters and the official presets.

Numbers are from the RecurrentGemma report (Table 1: 2.7B parameters, width 2560, 26 layers,
10 heads, MLP expansion 3, local attention window 2048) and the official package's presets
(`recurrentgemma/common.py`, see `shared/design/backbone.md` §2.1).

Shape letters used across this package: b batch, t query tokens, s key tokens, d width,
l lru_width, n num_heads (attention heads and RG-LRU gate blocks), h head_dim = d / n,
r rotary dims, f mlp_width (per branch), v vocab_size, w attention_window (cache slots),
k conv_width (temporal taps of the Conv1D).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import ml_dtypes

BlockType = Literal["recurrent", "attention"]
# "official": a query sees itself and the `attention_window` keys before it (W + 1 keys), as the
# deepmind code does; "hf": `attention_window` keys including itself, as transformers does.
WindowSemantics = Literal["official", "hf"]
ScanMethod = Literal["associative", "sequential"]

_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class RecurrentGemmaConfig:
    """Architecture of one RecurrentGemma / Griffin model (fields name their shape letter)."""

    num_layers: int
    width: int  # d
    num_heads: int  # n
    lru_width: int  # l
    mlp_width: int  # f: the expanded width of each MLP branch (3 * d in the presets)
    vocab_size: int = 256_000  # v
    num_kv_heads: int = 1  # multi-query attention: one key/value head
    conv_width: int = 4  # k
    attention_window: int = 2048  # w
    window_semantics: WindowSemantics = "official"
    block_pattern: tuple[BlockType, ...] = ("recurrent", "recurrent", "attention")
    logit_softcap: float | None = 30.0
    scale_embeddings: bool = True
    rope_base: float = 10_000.0
    rope_fraction: float = 0.5  # RoPE rotates the first half of each head only
    norm_eps: float = 1e-6
    lru_c: float = 8.0  # a_t = sigmoid(-a_param) ** (c * r_t)
    scan: ScanMethod = "associative"
    dtype: str = "float32"  # activations
    param_dtype: str = "float32"
    remat: bool = False  # rematerialise each block in the backward pass
    # Names the family in a `model=` config node, as ModelConfig.family does for Gemma.
    family: Literal["recurrentgemma"] = "recurrentgemma"

    def __post_init__(self) -> None:
        if self.family != "recurrentgemma":
            raise ValueError(f"family must be 'recurrentgemma', got {self.family!r}")
        for name in ("num_layers", "width", "num_heads", "lru_width", "mlp_width", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_kv_heads != 1:
            raise ValueError(f"RecurrentGemma uses one key/value head, got {self.num_kv_heads}")
        if self.width % self.num_heads or self.lru_width % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide width={self.width} and "
                f"lru_width={self.lru_width}"
            )
        if self.rotary_dim % 2 or self.rotary_dim <= 0:
            raise ValueError(f"rotary dims {self.rotary_dim} must be positive and even")
        if self.conv_width < 1 or self.attention_window < 1:
            raise ValueError("conv_width and attention_window must be positive")
        if self.window_semantics not in ("official", "hf"):
            raise ValueError(
                f"window_semantics must be 'official' or 'hf', got {self.window_semantics!r}"
            )
        if not self.block_pattern or any(
            b not in ("recurrent", "attention") for b in self.block_pattern
        ):
            raise ValueError(
                f"block_pattern must hold 'recurrent'/'attention', got {self.block_pattern}"
            )
        if self.scan not in ("associative", "sequential"):
            raise ValueError(f"scan must be 'associative' or 'sequential', got {self.scan!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name} must be one of {_DTYPES}")

    @property
    def head_dim(self) -> int:
        """h = d / n (fixed by the architecture, as in both references)."""
        return self.width // self.num_heads

    @property
    def rotary_dim(self) -> int:
        """r: leading dims of each head that RoPE rotates."""
        return int(self.head_dim * self.rope_fraction)

    @property
    def block_types(self) -> tuple[BlockType, ...]:
        """Temporal block of every layer (layer i is attention iff i % 3 == 2 in the presets)."""
        return tuple(
            self.block_pattern[i % len(self.block_pattern)] for i in range(self.num_layers)
        )

    @property
    def visible_keys(self) -> int:
        """How many keys (the query's own included) a local-attention query sees."""
        return self.attention_window + (1 if self.window_semantics == "official" else 0)

    @property
    def embed_scale(self) -> float:
        """sqrt(d) rounded to bfloat16, whatever the dtype: the official model was trained so
        (sqrt(2560) = 50.596 becomes 50.5); transformers keeps the same bf16 constant."""
        if not self.scale_embeddings:
            return 1.0
        return float(ml_dtypes.bfloat16(math.sqrt(self.width)))

    def replace(self, **changes: object) -> RecurrentGemmaConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, RecurrentGemmaConfig] = {
    "recurrentgemma_2b": RecurrentGemmaConfig(
        num_layers=26, width=2560, num_heads=10, lru_width=2560, mlp_width=3 * 2560
    ),
    "recurrentgemma_9b": RecurrentGemmaConfig(
        num_layers=38, width=4096, num_heads=16, lru_width=4096, mlp_width=3 * 4096
    ),
    # Tiny shapes for tests: two of each block kind's period, lru_width != width, window 8.
    "tiny_recurrentgemma": RecurrentGemmaConfig(
        num_layers=6,
        width=64,
        num_heads=4,
        lru_width=96,
        mlp_width=96,
        vocab_size=256,
        attention_window=8,
    ),
}


def get_preset(name: str, **overrides: object) -> RecurrentGemmaConfig:
    """The named preset, optionally with some fields changed."""
    if name not in PRESETS:
        raise KeyError(f"unknown RecurrentGemma preset {name!r}; known: {sorted(PRESETS)}")
    config = PRESETS[name]
    return config.replace(**overrides) if overrides else config
