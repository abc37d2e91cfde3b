"""Sampling from the backbone: batched KV-cache sampler (beam search and Best-of-N follow)."""

from posttrain.sampling.processors import process_logits, token_log_probs
from posttrain.sampling.sampler import SampleOutput, SamplingConfig, generate, sample

__all__ = [
    "SampleOutput",
    "SamplingConfig",
    "generate",
    "process_logits",
    "sample",
    "token_log_probs",
]
