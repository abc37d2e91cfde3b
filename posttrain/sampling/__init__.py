"""Sampling from any backbone: batched sampler, beam search and Best-of-N."""

from posttrain.sampling.beam_search import BeamOutput, beam_search
from posttrain.sampling.best_of_n import (
    BestOfNOutput,
    best_of_n,
    best_of_n_tokens,
    expected_best_of_n,
)
from posttrain.sampling.processors import process_logits, token_log_probs
from posttrain.sampling.prompting import encode_prompt, prompt_text
from posttrain.sampling.sampler import SampleOutput, SamplingConfig, generate, sample

__all__ = [
    "BeamOutput",
    "BestOfNOutput",
    "SampleOutput",
    "SamplingConfig",
    "beam_search",
    "best_of_n",
    "best_of_n_tokens",
    "encode_prompt",
    "expected_best_of_n",
    "generate",
    "process_logits",
    "prompt_text",
    "sample",
    "token_log_probs",
]
