"""REINFORCE with KL (algorithms.md §5.6) through the token-level losses, on tabular policies.

A bandit (one token per response) checks unbiasedness and convergence against the closed-form
optimum π* ∝ π_ref·exp(r/β); a two-token autoregressive policy (a table per prefix) checks
masking, token sums and per-token versus sequence KL bookkeeping against the optimum enumerated
over all sequences. Policies are softmax logits; every estimate goes through the same [b, t]
log-prob / mask functions the model path calls.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from posttrain.losses.kl import kl_k1, kl_k3, sequence_log_prob
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

ARMS = 100
BETA = 0.1
VOCAB = 5
END = 0  # in the variable-length task, a first token END ends the response
# What a misaligned or padded reference could hold at masked positions: if the mask were
# ignored anywhere, this would dominate the KL terms.
PADDING_JUNK = -30.0


def _relative_error(estimate, exact):
    return float(jnp.linalg.norm(estimate - exact) / jnp.linalg.norm(exact))


def _cosine(a, b):
    return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


def _kl(p_log, q_log):
    """KL(p‖q) of log-probability vectors, with 0·log 0 = 0 for outcomes p cannot produce."""
    p = jnp.exp(p_log)
    return jnp.sum(jnp.where(p > 0, p * (p_log - q_log), 0.0))


def _sample(key, logits, shape):
    """Draws from softmax(logits) by inverting the CDF: n uniforms and a binary search each,
    where Gumbel-max (`jax.random.categorical`) would draw n·K numbers, 2·10⁸ for the bandit."""
    cdf = jnp.cumsum(jax.nn.softmax(logits))
    uniform = jax.random.uniform(key, shape, maxval=cdf[-1])
    return jnp.minimum(jnp.searchsorted(cdf, uniform, side="right"), logits.shape[0] - 1)


# ----------------------------------------------------------------------------------------------
# The bandit: K arms, one token per response.


def _bandit():
    # default_rng(3) is the seed of algorithms.md's prototype (it reproduces the quoted figures).
    rng = np.random.default_rng(3)
    ref_logits = jnp.asarray(rng.normal(size=ARMS), jnp.float32)
    rewards = jnp.asarray(rng.normal(size=ARMS), jnp.float32)
    return ref_logits, rewards


def _bandit_objective(logits, ref_logits, rewards):
    """J(π) = E_π[r] − β·KL(π‖π_ref), exactly (sum over the arms)."""
    log_pi = jax.nn.log_softmax(logits)
    log_ref = jax.nn.log_softmax(ref_logits)
    return jnp.exp(log_pi) @ rewards - BETA * _kl(log_pi, log_ref)


def _bandit_token_log_probs(logits, arms):
    """[b, 1] log-probs of the sampled arms and an all-ones [b, 1] mask."""
    token_log_probs = jax.nn.log_softmax(logits)[arms][:, None]
    return token_log_probs, jnp.ones_like(token_log_probs)


def _bandit_surrogate(logits, ref_logits, rewards, arms, baseline, samples_per_prompt, carried):
    """Mean REINFORCE loss over the sampled arms (the one the model path builds), and carried."""
    policy_tok, mask = _bandit_token_log_probs(logits, arms)
    reference_tok, _ = _bandit_token_log_probs(ref_logits, arms)
    shaped = kl_shaped_reward(
        rewards[arms],
        sequence_log_prob(policy_tok, mask),
        sequence_log_prob(reference_tok, mask),
        BETA,
    )
    advantages, carried = compute_advantages(shaped, baseline, carried, samples_per_prompt)
    return jnp.mean(reinforce_loss(policy_tok, mask, advantages)), carried


def test_bandit_closed_form_optimum_matches_the_spec():
    # Given the spec's bandit, when π* ∝ π_ref·exp(r/β) is computed in closed form,
    ref_logits, rewards = _bandit()
    log_ref = jax.nn.log_softmax(ref_logits)
    log_opt = jax.nn.log_softmax(log_ref + rewards / BETA)
    optimum_value = BETA * jax.scipy.special.logsumexp(log_ref + rewards / BETA)
    # then E[r], KL and J* are the figures of algorithms.md §5.6, and J* = β log Z is the
    # value of the objective at π* (the variational identity).
    assert float(jnp.exp(log_opt) @ rewards) == pytest.approx(2.5484, abs=1e-4)
    assert float(_kl(log_opt, log_ref)) == pytest.approx(1.7795, abs=1e-4)
    assert float(optimum_value) == pytest.approx(2.3704, abs=1e-4)
    assert float(_bandit_objective(log_opt, ref_logits, rewards)) == pytest.approx(
        float(optimum_value), abs=1e-5
    )


@pytest.fixture(scope="module")
def bandit_gradients():
    """Estimated and exact gradients at a random policy from 2·10⁶ samples (k = 4).

    Ten times the spec's 2·10⁵: at a random N(0, 1) policy the Monte-Carlo floor of the
    relative error, sqrt(tr Cov / N)/‖∇J‖ computed over the arms, is 0.016 at 2·10⁵ samples,
    above the 0.01 gate; at 2·10⁶ it is 0.005.
    """
    ref_logits, rewards = _bandit()
    logits = jnp.asarray(np.random.default_rng(11).normal(size=ARMS), jnp.float32)
    samples, k = 2_000_000, 4
    log_ref = jax.nn.log_softmax(ref_logits)

    @jax.jit
    def estimate(logits):
        arms = _sample(jax.random.key(0), logits, (samples,))
        reference_tok, mask = _bandit_token_log_probs(ref_logits, arms)

        def surrogate(th, baseline):
            return _bandit_surrogate(th, ref_logits, rewards, arms, baseline, k, 0.0)[0]

        def kl_as_loss(th, estimator):
            policy_tok, _ = _bandit_token_log_probs(th, arms)
            return BETA * jnp.mean(estimator(policy_tok, reference_tok, mask))

        # The surrogates are −J's estimates, hence the minus signs.
        return {
            "none": -jax.grad(surrogate)(logits, "none"),
            "rloo": -jax.grad(surrogate)(logits, "rloo"),
            "mean": -jax.grad(surrogate)(logits, "mean"),
            "k1_as_loss": jax.grad(kl_as_loss)(logits, kl_k1),
            "k3_as_loss": jax.grad(kl_as_loss)(logits, kl_k3),
            "exact": jax.grad(_bandit_objective)(logits, ref_logits, rewards),
            "reverse_kl": jax.grad(lambda th: BETA * _kl(jax.nn.log_softmax(th), log_ref))(logits),
            "forward_kl": jax.grad(lambda th: BETA * _kl(log_ref, jax.nn.log_softmax(th)))(logits),
        }

    return jax.device_get(estimate(logits))


def test_kl_in_reward_and_rloo_are_unbiased_and_mean_with_self_is_scaled(bandit_gradients):
    g = bandit_gradients
    # Unbiased: within Monte-Carlo error of the exact ∇(E[r] − β·KL) (spec: ≤ 0.01).
    assert _relative_error(g["none"], g["exact"]) <= 0.01
    assert _relative_error(g["rloo"], g["exact"]) <= 0.01
    # The self-including mean scales the gradient by (k−1)/k: relative error 1/k = 0.25.
    assert _relative_error(g["mean"], g["exact"]) == pytest.approx(0.25, abs=0.01)


def test_kl_as_a_loss_pitfalls(bandit_gradients):
    g = bandit_gradients
    # k1 differentiated on samples: E_π[∇log π] = 0, so almost no gradient at all.
    k1_norm = float(jnp.linalg.norm(g["k1_as_loss"]))
    assert k1_norm < 0.05 * float(jnp.linalg.norm(g["reverse_kl"]))
    # k3 differentiated on samples: the gradient of the FORWARD KL(π_ref‖π).
    assert _cosine(g["k3_as_loss"], g["forward_kl"]) >= 0.99


def _train_bandit(baseline, steps=8000, prompts=32, k=4):
    ref_logits, rewards = _bandit()
    schedule = optax.cosine_decay_schedule(0.05, steps, alpha=0.002 / 0.05)
    optimizer = optax.adam(schedule)

    def step(state, key):
        logits, opt_state, carried = state
        arms = _sample(key, logits, (prompts * k,))
        grads, carried = jax.grad(_bandit_surrogate, has_aux=True)(
            logits, ref_logits, rewards, arms, baseline, k, carried
        )
        updates, opt_state = optimizer.update(grads, opt_state, logits)
        return (optax.apply_updates(logits, updates), opt_state, carried), None

    @jax.jit
    def run(key):
        init = (ref_logits, optimizer.init(ref_logits), jnp.zeros((), jnp.float32))
        (logits, _, _), _ = jax.lax.scan(step, init, jax.random.split(key, steps))
        return logits

    logits = run(jax.random.key(1))
    log_ref = jax.nn.log_softmax(ref_logits)
    log_opt = jax.nn.log_softmax(log_ref + rewards / BETA)
    kl_to_optimum = float(_kl(jax.nn.log_softmax(logits), log_opt))
    value_gap = float(
        _bandit_objective(logits, ref_logits, rewards)
        - _bandit_objective(log_opt, ref_logits, rewards)
    )
    return kl_to_optimum, value_gap


@pytest.mark.parametrize("baseline", ["rloo", "moving_average"])
def test_bandit_converges_to_the_closed_form_optimum(baseline):
    kl_to_optimum, value_gap = _train_bandit(baseline)
    assert kl_to_optimum <= 0.002
    assert abs(value_gap) <= 0.001


# ----------------------------------------------------------------------------------------------
# Two-token responses over a 5-token vocabulary: a first-token table [5] and a second-token
# table per first token [5, 5]. In the variable-length task a first token END ends the
# response, and its second position is padding (masked, junk in the reference's log-probs).


def _two_token_task(seed=5):
    rng = np.random.default_rng(seed)
    reference = {
        "first": jnp.asarray(rng.normal(size=VOCAB), jnp.float32),
        "second": jnp.asarray(rng.normal(size=(VOCAB, VOCAB)), jnp.float32),
    }
    rewards = jnp.asarray(rng.normal(size=(VOCAB, VOCAB)), jnp.float32)
    # Above most two-token rewards, so the one-token response (END,) holds 0.24 of π* at
    # β = 0.1 and a mishandled padding position moves the optimum visibly.
    end_reward = jnp.asarray(1.0, jnp.float32)
    return reference, rewards, end_reward


def _valid_sequences(variable_length):
    """[5, 5] True on the responses that exist; (END, 0) stands for the one-token (END,)."""
    ended_row = jnp.arange(VOCAB)[:, None] == END
    return jnp.where(variable_length & ended_row, jnp.arange(VOCAB)[None, :] == 0, True)


def _sequence_log_prob_table(tables, variable_length):
    """log π(y) of every response, [5, 5] (0 where the response does not exist)."""
    first = jax.nn.log_softmax(tables["first"])
    second = jax.nn.log_softmax(tables["second"], axis=-1)
    ended = variable_length & (jnp.arange(VOCAB)[:, None] == END)
    table = first[:, None] + jnp.where(ended, 0.0, second)
    return jnp.where(_valid_sequences(variable_length), table, 0.0)


def _table_kl(p_table, q_table, valid):
    return jnp.sum(jnp.where(valid, jnp.exp(p_table) * (p_table - q_table), 0.0))


def _reward_table(rewards, end_reward, variable_length):
    ended = variable_length & (jnp.arange(VOCAB)[:, None] == END)
    return jnp.where(ended, end_reward, rewards)


def _two_token_optimum(reference, rewards, end_reward, variable_length, beta):
    """log π*(y) ∝ log π_ref(y) + r(y)/β, normalised over the responses that exist."""
    valid = _valid_sequences(variable_length)
    unnormalised = _sequence_log_prob_table(reference, variable_length) + (
        _reward_table(rewards, end_reward, variable_length) / beta
    )
    log_z = jax.scipy.special.logsumexp(jnp.where(valid, unnormalised, -jnp.inf))
    return jnp.where(valid, unnormalised - log_z, 0.0)


def _two_token_objective(tables, reference, rewards, end_reward, variable_length, beta):
    """J(π) = E_π[r] − β·KL(π‖π_ref) by enumerating the responses."""
    valid = _valid_sequences(variable_length)
    log_pi = _sequence_log_prob_table(tables, variable_length)
    log_ref = _sequence_log_prob_table(reference, variable_length)
    reward = _reward_table(rewards, end_reward, variable_length)
    expected_reward = jnp.sum(jnp.where(valid, jnp.exp(log_pi) * reward, 0.0))
    return expected_reward - beta * _table_kl(log_pi, log_ref, valid)


def _sample_two_tokens(key, tables, rows):
    """tokens [b, 2]: the first from its table, the second from its prefix's row."""
    first_key, second_key = jax.random.split(key)
    first = _sample(first_key, tables["first"], (rows,))
    cdf = jnp.cumsum(jax.nn.softmax(tables["second"], axis=-1), axis=-1)[first]  # [b, v]
    uniform = jax.random.uniform(second_key, (rows, 1), maxval=cdf[:, -1:])
    second = jnp.minimum(jnp.sum(cdf <= uniform, axis=-1), VOCAB - 1)
    return jnp.stack([first, second], axis=1)


def _two_token_batch(tables, reference, tokens, variable_length):
    """(policy token log-probs, reference token log-probs with junk padding, mask), [b, 2]."""

    def token_log_probs(t):
        first = jax.nn.log_softmax(t["first"])[tokens[:, 0]]
        second = jax.nn.log_softmax(t["second"], axis=-1)[tokens[:, 0], tokens[:, 1]]
        return jnp.stack([first, second], axis=1)

    ended = variable_length & (tokens[:, 0] == END)
    mask = jnp.stack([jnp.ones_like(ended), ~ended], axis=1).astype(jnp.float32)
    reference_tok = jnp.where(mask > 0, token_log_probs(reference), PADDING_JUNK)
    return token_log_probs(tables), reference_tok, mask


def _two_token_rewards(tokens, rewards, end_reward, variable_length):
    ended = variable_length & (tokens[:, 0] == END)
    return jnp.where(ended, end_reward, rewards[tokens[:, 0], tokens[:, 1]])


@jax.jit
def _train_two_tokens(variable_length):
    """RLOO through the token-level functions; returns the trained and initial tables."""
    reference, rewards, end_reward = _two_token_task()
    steps, prompts, k = 3000, 32, 4
    optimizer = optax.adam(optax.cosine_decay_schedule(0.05, steps, alpha=0.002 / 0.05))

    def surrogate(tables, tokens):
        policy_tok, reference_tok, mask = _two_token_batch(
            tables, reference, tokens, variable_length
        )
        shaped = kl_shaped_reward(
            _two_token_rewards(tokens, rewards, end_reward, variable_length),
            sequence_log_prob(policy_tok, mask),
            sequence_log_prob(reference_tok, mask),
            BETA,
        )
        advantages, _ = compute_advantages(shaped, "rloo", samples_per_prompt=k)
        return jnp.mean(reinforce_loss(policy_tok, mask, advantages))

    def step(state, key):
        tables, opt_state = state
        tokens = _sample_two_tokens(key, tables, prompts * k)
        grads = jax.grad(surrogate)(tables, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, tables)
        return (optax.apply_updates(tables, updates), opt_state), None

    init = reference  # RLHF starts from the reference policy
    (tables, _), _ = jax.lax.scan(
        step, (init, optimizer.init(init)), jax.random.split(jax.random.key(2), steps)
    )
    log_opt = _two_token_optimum(reference, rewards, end_reward, variable_length, BETA)
    kl_to_optimum = _table_kl(
        _sequence_log_prob_table(tables, variable_length),
        log_opt,
        _valid_sequences(variable_length),
    )
    return kl_to_optimum, tables, init


@pytest.mark.parametrize("variable_length", [False, True], ids=["two_tokens", "ends_early"])
def test_two_token_policy_reaches_the_enumerated_optimum(variable_length):
    kl_to_optimum, tables, init = jax.device_get(_train_two_tokens(jnp.asarray(variable_length)))
    assert kl_to_optimum <= 0.01
    end_row_moved = not np.array_equal(tables["second"][END], init["second"][END])
    # After END the second position is padding: with the mask honoured no gradient reaches
    # that row, so Adam leaves it bitwise unchanged; with two tokens the row is trained.
    assert end_row_moved == (not variable_length)


def _perturbed_policy(reference, scale, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda t: t + scale * jnp.asarray(rng.normal(size=t.shape), jnp.float32), reference
    )


@jax.jit
def _kl_estimates(tables, samples_key):
    """k1 and k3 per sample [n] and the exact KL(π‖π_ref) of the variable-length task."""
    reference, _, _ = _two_token_task()
    variable_length = jnp.asarray(True)
    tokens = _sample_two_tokens(samples_key, tables, 200_000)
    policy_tok, reference_tok, mask = _two_token_batch(tables, reference, tokens, variable_length)
    exact = _table_kl(
        _sequence_log_prob_table(tables, variable_length),
        _sequence_log_prob_table(reference, variable_length),
        _valid_sequences(variable_length),
    )
    return kl_k1(policy_tok, reference_tok, mask), kl_k3(policy_tok, reference_tok, mask), exact


@pytest.mark.parametrize("scale", [0.3, 1.0], ids=["near", "far"])
def test_k1_and_k3_agree_with_the_exact_kl(scale):
    reference, _, _ = _two_token_task()
    tables = _perturbed_policy(reference, scale, seed=21)
    k1, k3, exact = jax.device_get(_kl_estimates(tables, jax.random.key(3)))
    for estimate in (k1, k3):
        standard_error = estimate.std() / np.sqrt(estimate.size)
        assert abs(estimate.mean() - exact) <= 3 * standard_error
    assert k3.min() >= 0.0  # each k3 term is non-negative; k1 rows can be negative
    if scale < 1.0:
        # Near the reference k3 is the lower-variance estimator.
        assert k3.var() < k1.var()


@jax.jit
def _per_sample_gradients(tables):
    """Per-sample gradient estimates of J, sequence versus reward-to-go KL, and the exact ∇J."""
    reference, rewards, end_reward = _two_token_task()
    variable_length = jnp.asarray(True)
    beta = 1.0  # a strong KL, so the penalties the reward-to-go drops are not negligible
    tokens = _sample_two_tokens(jax.random.key(4), tables, 100_000)

    def one_row(t, row, estimator):
        row = row[None]  # [1, 2]: the same [b, t] functions, one row at a time
        policy_tok, reference_tok, mask = _two_token_batch(t, reference, row, variable_length)
        reward = _two_token_rewards(row, rewards, end_reward, variable_length)
        if estimator == "sequence":
            shaped = kl_shaped_reward(
                reward,
                sequence_log_prob(policy_tok, mask),
                sequence_log_prob(reference_tok, mask),
                beta,
            )
            return -reinforce_loss(policy_tok, mask, shaped)[0]
        to_go = kl_reward_to_go(reward, policy_tok, reference_tok, mask, beta)
        return -per_token_reinforce_loss(policy_tok, mask, to_go)[0]

    def flat_gradients(estimator):
        grads = jax.vmap(jax.grad(one_row), in_axes=(None, 0, None))(tables, tokens, estimator)
        return jnp.concatenate([grads["first"], grads["second"].reshape(-1, VOCAB * VOCAB)], 1)

    exact = jax.grad(_two_token_objective)(
        tables, reference, rewards, end_reward, variable_length, beta
    )
    exact = jnp.concatenate([exact["first"], exact["second"].reshape(-1)])
    return flat_gradients("sequence"), flat_gradients("reward_to_go"), exact


def test_reward_to_go_keeps_the_expected_gradient_with_less_variance():
    reference, _, _ = _two_token_task()
    tables = _perturbed_policy(reference, 1.0, seed=22)
    sequence, to_go, exact = jax.device_get(_per_sample_gradients(tables))
    # Both estimate the same ∇J: within 3x their Monte-Carlo floor sqrt(tr Cov / n)/‖∇J‖
    # (0.0046 and 0.0041 here) of it.
    assert _relative_error(sequence.mean(0), exact) <= 0.015
    assert _relative_error(to_go.mean(0), exact) <= 0.015
    # Total variance (trace of the per-sample covariance): the dropped past penalties were
    # noise only.
    assert to_go.var(0).sum() < 0.9 * sequence.var(0).sum()


# ----------------------------------------------------------------------------------------------
# Closed forms of the pieces.


def test_clipped_ratio_loss_at_the_old_policy_is_reinforce():
    reference, _, _ = _two_token_task()
    advantages = jnp.linspace(-1.0, 1.5, 8)

    @jax.jit
    def values_and_jacobians(tables):
        tokens = _sample_two_tokens(jax.random.key(5), tables, 8)

        def token_log_probs(t):
            policy_tok, _, mask = _two_token_batch(t, reference, tokens, jnp.asarray(True))
            return policy_tok, mask

        old_tok, mask = token_log_probs(tables)

        def clipped(t):
            return clipped_ratio_loss(token_log_probs(t)[0], old_tok, mask, advantages)

        def plain(t):
            return reinforce_loss(token_log_probs(t)[0], mask, advantages)

        return clipped(tables), jax.jacrev(clipped)(tables), jax.jacrev(plain)(tables)

    value, clipped_jacobian, plain_jacobian = values_and_jacobians(reference)
    # At new == old ρ = 1, so the value is −A (reinforce_loss's is −A·log π(y): same gradient,
    # different value) and the gradient is −A·∇log π(y), row by row.
    np.testing.assert_allclose(value, -advantages, atol=1e-6)
    for name in ("first", "second"):
        np.testing.assert_allclose(clipped_jacobian[name], plain_jacobian[name], atol=1e-6)
    assert np.abs(plain_jacobian["second"]).max() > 0.1  # the comparison is not of zeros


def test_clipping_stops_the_gradient_only_in_the_advantages_direction():
    old_tok = jnp.full((4, 2), -1.0)
    mask = jnp.ones((4, 2))
    shift = jnp.array([0.5, -0.5, 0.5, 0.1])  # log ρ per row: e^0.5 = 1.65 and e^-0.5 = 0.61
    advantages = jnp.array([1.0, -1.0, -1.0, 1.0])
    new_tok = old_tok.at[:, 0].add(shift)
    grads = jax.grad(lambda new: jnp.sum(clipped_ratio_loss(new, old_tok, mask, advantages)))(
        new_tok
    )
    ratio = np.exp(np.asarray(shift))
    # Rows 0 and 1 left the band (ε = 0.2) the way their advantage pushes: clipped, no
    # gradient. Row 2 left it the other way and row 3 is inside: ∂/∂log π = −A·ρ on each token.
    expected = np.array([0.0, 0.0, 1.0 * ratio[2], -1.0 * ratio[3]])
    np.testing.assert_allclose(grads, np.repeat(expected[:, None], 2, 1), rtol=1e-6)


def test_sequence_log_prob_and_kl_estimators_ignore_padding():
    tokens = jnp.array([[-0.5, -1.0, -0.2], [-2.0, -jnp.inf, jnp.nan]])
    other = jnp.array([[-0.7, -0.4, -0.9], [-1.0, 3.0, -jnp.inf]])
    mask = jnp.array([[1, 1, 1], [1, 0, 0]])
    np.testing.assert_allclose(sequence_log_prob(tokens, mask), [-1.7, -2.0], rtol=1e-6)
    np.testing.assert_allclose(kl_k1(tokens, other, mask), [0.2 - 0.6 + 0.7, -1.0], rtol=1e-6)
    rho = np.array([[-0.2, 0.6, -0.7], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(
        kl_k3(tokens, other, mask), np.sum((np.exp(rho) - rho - 1) * np.asarray(mask), 1), rtol=1e-6
    )
    # Junk in padding (−inf, NaN) reaches neither the values nor the gradients.
    grads = jax.grad(lambda x: jnp.sum(kl_k3(x, other, mask) + kl_k1(x, other, mask)))(tokens)
    assert np.all(np.isfinite(grads)) and np.all(np.asarray(grads)[1, 1:] == 0.0)


def test_kl_shaped_reward_and_length_penalty():
    reward = jnp.array([1.0, -0.5])
    policy, reference = jnp.array([-3.0, -1.0]), jnp.array([-5.0, -0.5])
    lengths = jnp.array([10, 40])
    shaped = kl_shaped_reward(reward, policy, reference, 0.1, lengths, length_penalty=0.0005)
    np.testing.assert_allclose(
        shaped, [1.0 - 0.1 * 2.0 - 0.005, -0.5 + 0.1 * 0.5 - 0.02], rtol=1e-6
    )
    # The KL enters as a constant of the reward (stop-gradient), as in WARP's Algorithm 1.
    grad = jax.grad(lambda p: jnp.sum(kl_shaped_reward(reward, p, reference, 0.1)))(policy)
    np.testing.assert_array_equal(grad, [0.0, 0.0])
    with pytest.raises(ValueError, match="lengths"):
        kl_shaped_reward(reward, policy, reference, 0.1, length_penalty=0.0005)


def _rloo_reference(rewards):
    """algorithms.md Appendix A, NumPy."""
    k = rewards.shape[1]
    return rewards - (rewards.sum(1, keepdims=True) - rewards) / (k - 1)


def test_baselines_match_their_closed_forms():
    rewards = np.random.default_rng(7).normal(size=(6, 4)).astype(np.float32)
    rloo, _ = compute_advantages(jnp.asarray(rewards.reshape(-1)), "rloo", samples_per_prompt=4)
    np.testing.assert_allclose(rloo, _rloo_reference(rewards), rtol=1e-5, atol=1e-6)
    mean, _ = compute_advantages(jnp.asarray(rewards), "mean")
    np.testing.assert_allclose(mean, rloo * 3 / 4, rtol=1e-5, atol=1e-6)  # the (k−1)/k bias
    normalized, _ = compute_advantages(jnp.asarray(rewards), "group_normalized")
    np.testing.assert_allclose(np.mean(normalized, 1), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.std(normalized, 1), 1.0, atol=1e-5)
    none, carried = compute_advantages(jnp.asarray(rewards), "none", carried=0.7)
    np.testing.assert_array_equal(none, rewards)
    assert float(carried) == pytest.approx(0.7)
    # The moving average subtracts the value carried from earlier batches, then updates it.
    moving, carried = compute_advantages(jnp.asarray(rewards), "moving_average", carried=0.5)
    np.testing.assert_allclose(moving, rewards - 0.5, rtol=1e-6)
    assert float(carried) == pytest.approx(0.9 * 0.5 + 0.1 * rewards.mean(), rel=1e-6)
    _, carried = compute_advantages(jnp.asarray(rewards), "moving_average", 0.5, decay=0.99)
    assert float(carried) == pytest.approx(0.99 * 0.5 + 0.01 * rewards.mean(), rel=1e-6)
    np.testing.assert_allclose(leave_one_out_mean(jnp.array([[1.0, 2.0, 6.0]])), [[4, 3.5, 1.5]])


def test_baseline_registry_names_the_known_ones():
    assert set(BASELINES) == {"none", "moving_average", "rloo", "mean", "group_normalized"}
    assert get_baseline("rloo") is BASELINES["rloo"]
    with pytest.raises(ValueError, match="group_normalized, mean, moving_average, none, rloo"):
        get_baseline("grpo")
    with pytest.raises(ValueError, match="k >= 2"):
        compute_advantages(jnp.ones((3, 1)), "rloo")


def test_kl_reward_to_go_credits_each_token_its_future_penalties():
    reward = jnp.array([2.0, 1.0])
    policy = jnp.array([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    other = jnp.array([[-2.0, -1.0, -1.5], [-1.5, 9.0, 9.0]])
    mask = jnp.array([[1, 1, 1], [1, 0, 0]])
    # c_t = −β(log π − log q): row 0 [-0.5, 0.5, -0.5] at β = 0.5; row 1 [-0.25] then padding.
    expected = np.array([[2.0 - 0.5, 2.0 + 0.0, 2.0 - 0.5], [1.0 - 0.25, 0.0, 0.0]])
    to_go = kl_reward_to_go(reward, policy, other, mask, 0.5)
    np.testing.assert_allclose(to_go, expected, rtol=1e-6)
    # G_0 is the sequence-level shaped reward.
    shaped = kl_shaped_reward(
        reward, sequence_log_prob(policy, mask), sequence_log_prob(other, mask), 0.5
    )
    np.testing.assert_allclose(to_go[:, 0], shaped, rtol=1e-6)
    loss = per_token_reinforce_loss(policy, mask, to_go)
    np.testing.assert_allclose(loss, -np.sum(expected * np.asarray(policy) * np.asarray(mask), 1))
