"""A RecurrentGemma reward model computes each pair's shared prompt once: the prompt runs alone
and its state (RG-LRU state, Conv1D taps, the window's keys) seeds both sides. The forked
branches give the hidden states, rewards and gradients of the two sides run apart; a state one
token early or a window one key short does not. (The reward stage on forked pairs:
`tests/test_recurrentgemma_stages.py`.)"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pair_rows import pair_rows

from posttrain.data.preferences import PreferenceRows
from posttrain.data.shared_prompt import fork_prompts
from posttrain.losses.bradley_terry import bradley_terry_loss
from posttrain.models.backbone import forked_hidden, hidden_states, init_params
from posttrain.models.recurrentgemma import RecurrentGemma, get_preset, repeat_rows
from posttrain.rewards.reward_model import reward_scores, shared_prompt_rewards

# Recurrent, recurrent, attention; a window of 8, so most prompts below outrun it and the
# branches must find the prompt's last keys in the state's ring slots, not at its start.
CONFIG = get_preset("tiny_recurrentgemma", num_layers=3)
WIDTH = 40  # of the unshared rows

# Compiled once per config and shape, shared by the tests.
_forked = jax.jit(forked_hidden, static_argnums=0)
_full = jax.jit(hidden_states, static_argnums=0)


def _rows(sides: list[tuple[list[int], list[int]]], width: int = WIDTH) -> PreferenceRows:
    return pair_rows(sides, width, np.linspace(0.0, 0.5, len(sides)))


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)

    def draw(n: int) -> list[int]:
        return rng.integers(3, CONFIG.vocab_size, n).tolist()

    sides = []
    # (prefix, chosen rest, rejected rest): prompts past the window, one shorter than the
    # Conv1D's taps, and one of no common token (the branches start a fresh row).
    for prefix_len, chosen_len, rejected_len in [(20, 7, 12), (11, 3, 5), (2, 6, 4), (30, 4, 4)]:
        prefix = draw(prefix_len)
        sides.append(([*prefix, 1, *draw(chosen_len - 1)], [*prefix, 2, *draw(rejected_len - 1)]))
    sides.append(([1, *draw(9)], [2, *draw(5)]))
    # A side that is all prompt, and two equal sides: each keeps its last token in its branch.
    prefix = draw(12)
    sides.append((prefix, prefix + draw(3)))
    same = draw(10)
    sides.append((same, same))
    rows = _rows(sides)
    params = {
        "backbone": init_params(CONFIG, jax.random.key(1)),
        "head": {"w": jax.random.normal(jax.random.key(2), (CONFIG.width,)), "b": jnp.ones(())},
    }
    return rows, fork_prompts(rows), params


def _branch_error(config, backbone, rows: PreferenceRows, pairs, forked) -> float:
    """Max |forked - whole| over every real branch token, each side run whole as its own row."""
    prefixes, forked = pairs.prompt_segments.sum(axis=1), np.asarray(forked)
    worst = 0.0
    sides = ((rows.chosen, rows.chosen_segments), (rows.rejected, rows.rejected_segments))
    for j, (tokens, segments) in enumerate(sides):
        whole = np.asarray(_full(config, backbone, tokens, None, segments))
        for i, p in enumerate(prefixes):
            rest = pairs.segments[i, j].sum()
            worst = max(worst, np.abs(forked[i, j, :rest] - whole[i, p : p + rest]).max())
    return float(worst)


def _fork(config, backbone, pairs, prompt=None, prompt_segments=None):
    prompt = pairs.prompt if prompt is None else prompt
    prompt_segments = pairs.prompt_segments if prompt_segments is None else prompt_segments
    return _forked(
        config, backbone, prompt, prompt_segments, pairs.tokens, pairs.positions, pairs.segments
    )


@functools.partial(jax.jit, static_argnums=(0, 1))
def _fork_with(prompt_config, branch_config, backbone, pairs):
    """`forked_hidden` with the prompt and the branches run under different configs."""
    state = (
        RecurrentGemma(prompt_config)
        .apply(
            {"params": backbone},
            pairs.prompt,
            None,
            pairs.prompt_segments,
            compute_logits=False,
            return_state=True,
        )
        .state
    )
    b, m, t = pairs.tokens.shape
    out = RecurrentGemma(branch_config).apply(
        {"params": backbone},
        pairs.tokens.reshape(b * m, t),
        pairs.positions.reshape(b * m, t),
        pairs.segments.reshape(b * m, t),
        compute_logits=False,
        context=repeat_rows(state, m),
    )
    return out.hidden.reshape(b, m, t, -1)


def test_layout_of_the_prompt_block_and_both_branches():
    rows = _rows([([5, 6, 7, 8], [5, 6, 9]), ([5, 6], [5, 6, 7])], width=4)
    pairs = fork_prompts(rows, multiple=4)
    # Left-padded prompts end in the last column; the second pair's chosen side is all prompt,
    # so one of its tokens moves into the branch.
    assert pairs.prompt.tolist() == [[0, 0, 5, 6], [0, 0, 0, 5]]
    assert pairs.prompt_segments.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    assert pairs.tokens.tolist() == [[[7, 8, 0, 0], [9, 0, 0, 0]], [[6, 0, 0, 0], [6, 7, 0, 0]]]
    assert pairs.positions[0, 0].tolist() == [2, 3, 4, 5]
    assert pairs.positions[1, 1].tolist() == [1, 2, 3, 4]
    assert pairs.last.tolist() == [[1, 0], [0, 1]]


@pytest.mark.parametrize("semantics", ["official", "hf"])
def test_forked_branches_equal_each_side_run_whole(case, semantics):
    # Given pairs whose prompts outrun the window, under either window semantics,
    rows, pairs, params = case
    assert pairs.prompt_segments.sum(axis=1).max() > CONFIG.attention_window + 1
    config = CONFIG.replace(window_semantics=semantics)
    # when the prompt runs once and both branches continue its state,
    forked = _fork(config, params["backbone"], pairs)
    # then every branch token's hidden state is the one its whole row gives.
    assert _branch_error(config, params["backbone"], rows, pairs, forked) < 1e-5


def test_rewards_and_bradley_terry_gradients_equal_the_unshared_pairs(case):
    rows, pairs, params = case

    def rewards_and_gradients(scores):
        def loss(p):
            chosen, rejected = scores(p)
            losses = bradley_terry_loss(chosen, rejected, rows.margin, rows.label, 0.01)
            return jnp.sum(losses), (chosen, rejected)

        return jax.jit(jax.grad(loss, has_aux=True))(params)

    got, got_rewards = rewards_and_gradients(lambda p: shared_prompt_rewards(CONFIG, p, pairs))
    want, want_rewards = rewards_and_gradients(
        lambda p: (
            reward_scores(CONFIG, p, rows.chosen, rows.chosen_segments),
            reward_scores(CONFIG, p, rows.rejected, rows.rejected_segments),
        )
    )
    for a, b in zip(got_rewards, want_rewards, strict=True):
        assert float(jnp.abs(a - b).max()) < 1e-5
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        # The prompt's gradient is summed once instead of twice: float32 order noise, scaled.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_a_state_one_token_early_or_a_window_one_key_short_differs(case):
    rows, pairs, params = case
    backbone = params["backbone"]
    # The state after all but the prompt's last token: the prompt block shifted right by one.
    early = [np.pad(a[:, :-1], ((0, 0), (1, 0))) for a in (pairs.prompt, pairs.prompt_segments)]
    forked = _fork(CONFIG, backbone, pairs, *early)
    assert _branch_error(CONFIG, backbone, rows, pairs, forked) > 1e-3
    # The right state, but branches that see one key fewer than the prompt did.
    forked = _fork_with(CONFIG, CONFIG.replace(window_semantics="hf"), backbone, pairs)
    assert _branch_error(CONFIG, backbone, rows, pairs, forked) > 1e-3
