"""Losses: pure functions of hidden states, log-probabilities, rewards and masks."""

from posttrain.losses.log_probs import chunked_token_log_probs, sequence_token_log_probs
from posttrain.losses.sft import masked_nll_sum

__all__ = ["chunked_token_log_probs", "masked_nll_sum", "sequence_token_log_probs"]
