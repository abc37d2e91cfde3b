"""Pairs with their shared prompt laid out once score exactly as the two sides do apart."""

import jax
import jax.numpy as jnp
import numpy as np
from pair_rows import pair_rows

from posttrain.data.preferences import PreferenceRows
from posttrain.data.shared_prompt import CHOSEN, PREFIX, REJECTED, share_prompts
from posttrain.losses.bradley_terry import bradley_terry_loss
from posttrain.models import get_preset, init_params
from posttrain.rewards.reward_model import reward_scores, shared_prompt_rewards

# A window of 8 on local layers: prefixes and continuations below are longer, so the window
# must be measured in positions, not in row indices, for the scores to match.
CONFIG = get_preset("tiny_gemma2", sliding_window=8)


def _rows(sides: list[tuple[list[int], list[int]]], width: int) -> PreferenceRows:
    return pair_rows(sides, width)


def test_layout_of_prefix_and_both_continuations():
    rows = _rows([([5, 6, 7, 8], [5, 6, 9]), ([5, 6], [5, 6, 7]), ([4, 4], [4, 4])], 6)
    pairs = share_prompts(rows, multiple=8)
    assert pairs.tokens.shape == (3, 8)
    assert pairs.tokens[0, :5].tolist() == [5, 6, 7, 8, 9]
    assert pairs.positions[0, :5].tolist() == [0, 1, 2, 3, 2]
    assert pairs.branches[0, :5].tolist() == [PREFIX, PREFIX, CHOSEN, CHOSEN, REJECTED]
    assert pairs.segments[0].tolist() == [1] * 5 + [0] * 3
    assert pairs.last.tolist() == [[3, 4], [1, 2], [1, 1]]  # a side that is all prefix ends in it


def test_shared_prompt_rewards_and_gradients_equal_separate_scoring():
    rng = np.random.default_rng(0)
    sides = []
    # Five pairs: the rows run as two forwards of unequal halves (2 and 3).
    shapes = [(20, 7, 12), (3, 15, 2), (11, 1, 9), (30, 4, 4), (7, 3, 5)]
    for prefix_len, chosen_len, rejected_len in shapes:
        prefix = rng.integers(3, CONFIG.vocab_size, prefix_len).tolist()
        chosen = [1, *rng.integers(3, CONFIG.vocab_size, chosen_len - 1).tolist()]
        rejected = [2, *rng.integers(3, CONFIG.vocab_size, rejected_len - 1).tolist()]
        sides.append((prefix + chosen, prefix + rejected))
    rows = _rows(sides, 40)
    pairs = share_prompts(rows)
    assert pairs.tokens.shape[1] < 2 * 40
    params = {
        "backbone": init_params(CONFIG, jax.random.key(1)),
        "head": {"w": jax.random.normal(jax.random.key(2), (CONFIG.embed_dim,)), "b": jnp.ones(())},
    }

    def separate(p):
        return (
            reward_scores(CONFIG, p, rows.chosen, rows.chosen_segments),
            reward_scores(CONFIG, p, rows.rejected, rows.rejected_segments),
        )

    def shared(p):
        return shared_prompt_rewards(CONFIG, p, pairs)

    for got, want in zip(jax.jit(shared)(params), jax.jit(separate)(params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    def loss(score_fn):
        return lambda p: jnp.sum(bradley_terry_loss(*score_fn(p)))

    got = jax.jit(jax.grad(loss(shared)))(params)
    want = jax.jit(jax.grad(loss(separate)))(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        # The prefix's gradient is summed once instead of twice: float32 order noise, scaled.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
