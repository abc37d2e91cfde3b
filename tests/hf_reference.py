"""Tiny random transformers checkpoints used as the parity reference (torch, float32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

# Each case exercises a trap: MQA; MHA with heads*head_dim != d_model; Gemma 2 with
# query_pre_attn_scalar != head_dim and small soft-caps that actually bind; standard caps.
CASES = {
    "gemma1_mqa": dict(
        family="gemma",
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
    ),
    "gemma1_mha": dict(
        family="gemma",
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=24,
    ),
    "gemma2_stress": dict(
        family="gemma2",
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=8,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
    ),
    "gemma2": dict(
        family="gemma2",
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
    ),
}
VOCAB = 256
WIDTH = 64


def make_reference(case: str, directory: Path, seed: int = 0) -> transformers.PreTrainedModel:
    """Build a random transformers model for `case`, save it to `directory`, return it."""
    fields = dict(CASES[case])
    family = fields.pop("family")
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=96, initializer_range=0.15)
    if family == "gemma":
        model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**common, **fields))
    else:
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**common, **fields))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:  # norms are zero at init; make every one of them matter
                parameter.normal_(0.0, 0.5)
    model.eval()
    model.save_pretrained(directory)
    return model


def reference_logits(model: transformers.PreTrainedModel, tokens: np.ndarray) -> np.ndarray:
    """Float32 logits of the reference model."""
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
