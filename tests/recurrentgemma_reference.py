"""A tiny random transformers RecurrentGemma checkpoint: the parity reference (torch, float32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

VOCAB = 256
# Two periods of (recurrent, recurrent, attention); lru_width != hidden_size and a window far
# shorter than the test rows, so that both the recurrence and the window are exercised.
FIELDS = dict(
    num_hidden_layers=6,
    vocab_size=VOCAB,
    hidden_size=64,
    lru_width=96,
    intermediate_size=2 * 80,  # transformers' convention: 2 x the MLP branch width
    num_attention_heads=4,
    num_key_value_heads=1,
    attention_window_size=8,
    logits_soft_cap=30.0,
)


def make_reference(directory: Path, seed: int = 0) -> transformers.PreTrainedModel:
    """Build a random RecurrentGemmaForCausalLM, save it (safetensors) to `directory`, return it."""
    torch.manual_seed(seed)
    model = transformers.RecurrentGemmaForCausalLM(transformers.RecurrentGemmaConfig(**FIELDS))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            # The default init zeroes norms and biases and makes the conv taps tiny; give every
            # tensor weight so that a mapping mistake shows in the logits.
            if name.endswith("norm.weight") or name.endswith("bias"):
                parameter.normal_(0.0, 0.3)
            elif "conv_1d.weight" in name:
                parameter.normal_(0.0, 0.4)
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def reference_logits(
    model: transformers.PreTrainedModel,
    tokens: np.ndarray,
    positions: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Float32 logits [b, t, v] of the reference model (no cache)."""
    kwargs = {}
    if positions is not None:
        kwargs["position_ids"] = torch.as_tensor(positions, dtype=torch.long)
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(attention_mask, dtype=torch.long)
    with torch.no_grad():
        out = model(torch.as_tensor(tokens, dtype=torch.long), use_cache=False, **kwargs)
    return out.logits.float().numpy()


def reference_hidden(model: transformers.PreTrainedModel, tokens: np.ndarray) -> np.ndarray:
    """Final normalised hidden states [b, t, d] of the reference model."""
    with torch.no_grad():
        out = model.model(torch.as_tensor(tokens, dtype=torch.long), use_cache=False)
    return out.last_hidden_state.float().numpy()
