"""Best-of-N selection (text rewards and token scorers) and the unbiased best-of-n estimator."""

import jax
import numpy as np
import pytest

from posttrain.data.synthetic import bilingual_corpus
from posttrain.models import get_preset, init_params
from posttrain.rewards.api import RuleReward
from posttrain.sampling import SamplingConfig
from posttrain.sampling.best_of_n import best_of_n, best_of_n_tokens, expected_best_of_n
from posttrain.tokenizer import END_OF_TURN_ID, EOS_ID, GemmaTokenizer, train_tokenizer

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
    out = best_of_n_tokens(CONFIG, params, PROMPTS, 8, count_of_token_7, SAMPLING)
    assert out.pool_tokens.shape == (2, 8, 6)
    np.testing.assert_array_equal(out.best_rewards, out.pool_rewards.max(axis=1))
    for row in range(2):
        best = out.best_tokens[row][: out.pool_lengths[row, out.best_index[row]]].tolist()
        assert count_of_token_7(None, [best])[0] == pytest.approx(out.best_rewards[row])
    # Different samples were drawn, so selection had something to choose from.
    assert len({tuple(t) for t in out.pool_tokens[0]}) > 1


def test_ties_pick_the_first_and_offsets_change_nothing(params):
    constant = best_of_n_tokens(CONFIG, params, PROMPTS, 4, lambda p, r: [3.0] * len(r), SAMPLING)
    np.testing.assert_array_equal(constant.best_index, [0, 0])
    plain = best_of_n_tokens(CONFIG, params, PROMPTS, 4, count_of_token_7, SAMPLING)
    shifted = best_of_n_tokens(
        CONFIG, params, PROMPTS, 4, lambda p, r: np.add(count_of_token_7(p, r), 100.0), SAMPLING
    )
    np.testing.assert_array_equal(plain.best_index, shifted.best_index)


def test_reward_of_wrong_shape_is_rejected(params):
    with pytest.raises(ValueError, match="one reward per"):
        best_of_n_tokens(CONFIG, params, PROMPTS, 4, lambda p, r: [0.0], SAMPLING)


TEXT_PROMPTS = ["What is 3 plus 4?", "天気について教えてください。",
                [{"role": "user", "content": "Tell me about trains."}]]  # fmt: skip
TEXT_SAMPLING = SamplingConfig(max_new_tokens=8, stop_ids=(EOS_ID, END_OF_TURN_ID), seed=3)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny sentencepiece tokenizer and a random tiny model that often ends with <end_of_turn>.

    A random model samples near-uniformly, so <end_of_turn> would almost never come. Its
    embedding row becomes 3x that of the token sampled most (tied weights: 3x its logit), so
    some samples stop at once, some later, some not at all.
    """
    root = tmp_path_factory.mktemp("bon_text")
    tokenizer = GemmaTokenizer(train_tokenizer(bilingual_corpus(600), root / "tok", 600))
    config = get_preset("tiny_gemma2", vocab_size=tokenizer.vocab_size)
    params = init_params(config, jax.random.key(0))
    zeros = lambda prompts, responses: np.zeros(len(responses))  # noqa: E731
    pool = best_of_n(config, params, tokenizer, TEXT_PROMPTS, 8, zeros, TEXT_SAMPLING)
    counts = np.bincount(pool.pool_tokens.ravel(), minlength=config.vocab_size)
    counts[0] = 0  # padding after a row's end
    table = np.asarray(params["embedder"]["input_embedding"]).copy()
    table[END_OF_TURN_ID] = 3.0 * table[np.argmax(counts)]
    params = {**params, "embedder": {**params["embedder"], "input_embedding": table}}
    return config, params, tokenizer


def own_text(tokenizer, tokens, length) -> str:
    """The response text by the spec: the row cut at its length, less a final stop token."""
    ids = tokens[:length].tolist()
    if ids and ids[-1] in TEXT_SAMPLING.stop_ids:
        ids = ids[:-1]
    return tokenizer.decode(ids)


def test_text_best_of_n_keeps_the_highest_rule_reward(text_model):
    # Given a bilingual rule reward that records what it is handed,
    config, params, tokenizer = text_model
    rule, handed = RuleReward("language_match"), []

    def recording_rule(prompts, responses):
        handed.append((list(prompts), list(responses)))
        return rule(prompts, responses)

    # when Best-of-8 runs on string and chat prompts,
    out = best_of_n(config, params, tokenizer, TEXT_PROMPTS, 8, recording_rule, TEXT_SAMPLING)

    # then the reward saw every sample once, as text with neither stop token nor padding,
    assert len(handed) == 1
    prompts, responses = handed[0]
    assert prompts == [p for p in TEXT_PROMPTS for _ in range(8)]
    finished = out.pool_tokens[np.arange(3)[:, None], np.arange(8), out.pool_lengths - 1]
    assert np.sum(finished == END_OF_TURN_ID) >= 4  # early stops happened, so stripping mattered
    assert not any("<end_of_turn>" in r or "<pad>" in r for r in responses)
    expected_texts = [
        [own_text(tokenizer, out.pool_tokens[i, j], out.pool_lengths[i, j]) for j in range(8)]
        for i in range(3)
    ]
    assert responses == [t for row in expected_texts for t in row]
    assert out.pool_responses == expected_texts
    # and each prompt keeps the first pool member with the highest rule reward.
    scores = rule(prompts, [t for row in expected_texts for t in row]).reshape(3, 8)
    np.testing.assert_array_equal(out.pool_rewards, scores)
    np.testing.assert_array_equal(out.best_index, np.argmax(scores, axis=1))
    np.testing.assert_array_equal(out.best_rewards, scores.max(axis=1))
    assert out.best_responses == [expected_texts[i][out.best_index[i]] for i in range(3)]
    assert any(0 < row.sum() < 8 for row in scores)  # some pool had a choice to make


def test_text_rewards_of_wrong_shape_or_nan_fail_naming_the_reward(text_model):
    config, params, tokenizer = text_model

    def one_reward_only(prompts, responses):
        return [1.0]

    def nan_for_the_second(prompts, responses):
        return [0.0, np.nan] + [0.0] * (len(responses) - 2)

    # Pools of 8, as in the fixture, so the sampler is not compiled again.
    with pytest.raises(
        ValueError, match=r"one_reward_only returned shape \(1,\), expected \(24,\)"
    ):
        best_of_n(config, params, tokenizer, TEXT_PROMPTS, 8, one_reward_only, TEXT_SAMPLING)
    with pytest.raises(ValueError, match="nan_for_the_second returned a non-finite reward nan"):
        best_of_n(config, params, tokenizer, TEXT_PROMPTS, 8, nan_for_the_second, TEXT_SAMPLING)


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
