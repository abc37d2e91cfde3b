"""Losses: pure functions of hidden states, log-probabilities, rewards and masks."""

from posttrain.losses.best_of_n_exact import (
    best_of_n_kl_bound,
    best_of_n_probabilities,
    best_of_n_working_approximation,
    mid_rank_cdf,
    quantile_le,
    quantile_lt,
)
from posttrain.losses.bond import (
    batch_leave_one_out_baseline,
    bond_backward_return,
    bond_loss,
    jbond_loss,
    jbond_return,
    jbond_reward,
    log_quantile,
    should_replace_anchor,
)
from posttrain.losses.kl import kl_k1, kl_k3, sequence_log_prob
from posttrain.losses.log_probs import chunked_token_log_probs, sequence_token_log_probs
from posttrain.losses.policy_gradient import (
    BASELINES,
    clipped_ratio_loss,
    compute_advantages,
    get_baseline,
    kl_reward_to_go,
    kl_shaped_reward,
    leave_one_out_mean,
    per_token_reinforce_loss,
    reinforce_loss,
)
from posttrain.losses.sft import masked_nll_sum

__all__ = ["chunked_token_log_probs", "masked_nll_sum", "sequence_token_log_probs"]
__all__ += [
    "BASELINES",
    "clipped_ratio_loss",
    "compute_advantages",
    "get_baseline",
    "kl_k1",
    "kl_k3",
    "kl_reward_to_go",
    "kl_shaped_reward",
    "leave_one_out_mean",
    "per_token_reinforce_loss",
    "reinforce_loss",
    "sequence_log_prob",
]
__all__ += [
    "batch_leave_one_out_baseline",
    "best_of_n_kl_bound",
    "best_of_n_probabilities",
    "best_of_n_working_approximation",
    "bond_backward_return",
    "bond_loss",
    "jbond_loss",
    "jbond_return",
    "jbond_reward",
    "log_quantile",
    "mid_rank_cdf",
    "quantile_le",
    "quantile_lt",
    "should_replace_anchor",
]
