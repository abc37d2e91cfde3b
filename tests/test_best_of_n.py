"""Best-of-N selection and the unbiased best-of-n estimator from one pool."""

import jax
import numpy as np
import pytest

from posttrain.models import get_preset, init_params
from posttrain.sampling import SamplingConfig
from posttrain.sampling.best_of_n import best_of_n, expected_best_of_n

CONFIG = get_preset("tiny_gemma2")
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12]]
SAMPLING = SamplingConfig(max_new_tokens=6, temperature=1.0, stop_ids=(1,), seed=2)


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


def count_of_token_7(prompts, responses):
    """A rule reward: how often token 7 appears in the response."""
    return [response.count(7) + 0.01 * len(response) for response in responses]


def test_best_is_the_maximum_of_the_pool(params):
    out = best_of_n(CONFIG, params, PROMPTS, 8, count_of_token_7, SAMPLING)
    assert out.pool_tokens.shape == (2, 8, 6)
    np.testing.assert_array_equal(out.best_rewards, out.pool_rewards.max(axis=1))
    for row in range(2):
        best = out.best_tokens[row][: out.pool_lengths[row, out.best_index[row]]].tolist()
        assert count_of_token_7(None, [best])[0] == pytest.approx(out.best_rewards[row])
    # Different samples were drawn, so selection had something to choose from.
    assert len({tuple(t) for t in out.pool_tokens[0]}) > 1


def test_ties_pick_the_first_and_offsets_change_nothing(params):
    constant = best_of_n(CONFIG, params, PROMPTS, 4, lambda p, r: [3.0] * len(r), SAMPLING)
    np.testing.assert_array_equal(constant.best_index, [0, 0])
    plain = best_of_n(CONFIG, params, PROMPTS, 4, count_of_token_7, SAMPLING)
    shifted = best_of_n(
        CONFIG, params, PROMPTS, 4, lambda p, r: np.add(count_of_token_7(p, r), 100.0), SAMPLING
    )
    np.testing.assert_array_equal(plain.best_index, shifted.best_index)


def test_reward_of_wrong_shape_is_rejected(params):
    with pytest.raises(ValueError, match="one reward per"):
        best_of_n(CONFIG, params, PROMPTS, 2, lambda p, r: [0.0], SAMPLING)


def test_estimator_is_unbiased_for_a_categorical():
    rng = np.random.default_rng(0)
    values = np.arange(10, dtype=np.float64)
    probs = rng.dirichlet(np.ones(10))
    cdf = np.cumsum(probs)
    cdf_below = cdf - probs
    size, pools = 16, 10_000
    draws = rng.choice(values, size=(pools, size), p=probs)
    estimates = expected_best_of_n(draws)  # [pools, 16]
    for n in range(1, size + 1):
        exact = float(np.sum(values * (cdf**n - cdf_below**n)))
        mean = estimates[:, n - 1].mean()
        stderr = estimates[:, n - 1].std() / np.sqrt(pools)
        assert abs(mean - exact) <= 3 * stderr + 1e-12, (n, mean, exact)


def test_estimator_edges():
    pool = np.array([3.0, -1.0, 2.0, 5.0])
    estimate = expected_best_of_n(pool)
    assert estimate[0] == pytest.approx(pool.mean())  # best of 1 is a plain draw
    assert estimate[-1] == pytest.approx(pool.max())  # best of N is the pool maximum
    assert np.all(np.diff(estimate) >= 0)
    # A gold value of the proxy-selected draw: order by reward, average the gold value.
    gold = np.array([0.0, 1.0, 0.0, 10.0])
    assert expected_best_of_n(pool, gold)[-1] == pytest.approx(10.0)
