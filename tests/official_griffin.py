"""Google's `recurrentgemma` package as a parity reference: its modules and a Griffin of a config."""

from __future__ import annotations

import pytest


def official_package():
    """(common, jax) modules of the official package; skips the test when it is not installed."""
    try:
        from recurrentgemma import common
        from recurrentgemma import jax as official
    except ImportError:
        pytest.skip("the official recurrentgemma package is not installed")
    return common, official


def official_griffin(common, official, config):
    """The official Griffin with the same architecture as our RecurrentGemma `config`."""
    kinds = {
        "recurrent": common.TemporalBlockType.RECURRENT,
        "attention": common.TemporalBlockType.ATTENTION,
    }
    griffin = common.GriffinConfig(
        vocab_size=config.vocab_size,
        width=config.width,
        mlp_expanded_width=config.mlp_width,
        num_heads=config.num_heads,
        lru_width=config.lru_width,
        block_types=tuple(kinds[k] for k in config.block_types),
        embeddings_scale_by_sqrt_dim=True,
        attention_window_size=config.attention_window,
        logits_soft_cap=config.logit_softcap,
        scan_type=common.ScanType.LINEAR_NATIVE,
    )
    return official.Griffin(griffin, gradient_checkpointing=False)
