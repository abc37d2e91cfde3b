"""The reward API: model rewards equal the reward model's scores whatever the batching; rules,
ensembles, weighted sums and recentring in closed form; config errors name the culprit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain.data.preferences import encode_for_reward
from posttrain.data.synthetic import bilingual_corpus
from posttrain.models import get_preset, init_params
from posttrain.rewards.api import (
    EnsembleReward,
    ModelReward,
    Recentred,
    RuleReward,
    WeightedSum,
    decode_responses,
    reward_from_config,
    score_rollouts,
)
from posttrain.rewards.reward_model import reward_scores, save_reward_model
from posttrain.tokenizer import END_OF_TURN_ID, PAD_ID, GemmaTokenizer, train_tokenizer

PROMPTS = ["What is 3 plus 4?", "天気について教えてください。", "Tell me about trains.",
           [{"role": "user", "content": "山について教えてください。"}], "5 たす 6 はいくつですか？"]  # fmt: skip
RESPONSES = ["The answer is 7.", "天気について短く説明します。", "答えは 11 です。",
             "Here is a short note about mountains.", "答えは 11 です。"]  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    tokenizer = GemmaTokenizer(train_tokenizer(bilingual_corpus(600), root / "tok", 600))
    config = get_preset("tiny_gemma2", vocab_size=tokenizer.vocab_size)
    models = []
    for seed in (0, 1):
        params = {
            "backbone": init_params(config, jax.random.key(seed)),
            "head": {
                "w": jax.random.normal(jax.random.key(10 + seed), (config.embed_dim,)),
                "b": jnp.float32(seed),
            },
        }
        models.append(save_reward_model(config, params, root / f"rm{seed}"))
        models[-1] = (models[-1], params)
    return root, tokenizer, config, models


# Jitted: op by op, each pair's reference forward took seconds.
_reward_scores = jax.jit(reward_scores, static_argnums=0)


def test_model_reward_equals_the_reward_model_on_each_pair(assets):
    _, tokenizer, config, models = assets
    directory, params = models[0]
    reward = ModelReward(
        directory, tokenizer, preamble="Reply in the user's language.", batch_size=2
    )
    got = reward(PROMPTS, RESPONSES)
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=True)):
        ids = np.asarray([encode_for_reward(tokenizer, prompt, response, reward.preamble)])
        expected = _reward_scores(config, params, ids, np.ones_like(ids))
        np.testing.assert_allclose(got[i], expected[0], atol=2e-5)
    # Batch composition and padding do not change a pair's reward.
    alone = ModelReward(directory, tokenizer, reward.preamble, batch_size=8)
    np.testing.assert_allclose(alone(PROMPTS[3:4], RESPONSES[3:4]), got[3:4], atol=2e-5)
    assert got.dtype == np.float32 and np.all(np.isfinite(got))
    with pytest.raises(ValueError, match="5 prompts but 4 responses"):
        reward(PROMPTS, RESPONSES[:4])


def test_rules_ensembles_sums_and_recentring(assets):
    _, tokenizer, _, models = assets
    rule = RuleReward("language_match")
    np.testing.assert_array_equal(rule(PROMPTS, RESPONSES), [1, 1, 0, 0, 1])
    a, b = (ModelReward(d, tokenizer) for d, _ in models)
    np.testing.assert_allclose(
        EnsembleReward([a, b])(PROMPTS, RESPONSES),
        (a(PROMPTS, RESPONSES) + b(PROMPTS, RESPONSES)) / 2,
        atol=1e-6,
    )
    total = WeightedSum([(0.5, a), (2.0, rule)])
    np.testing.assert_allclose(
        total(PROMPTS, RESPONSES), 0.5 * a(PROMPTS, RESPONSES) + 2.0 * rule(PROMPTS, RESPONSES),
        atol=1e-6,
    )  # fmt: skip
    centred = Recentred(total).fit(PROMPTS, RESPONSES)
    assert abs(float(np.mean(centred(PROMPTS, RESPONSES)))) < 1e-5
    np.testing.assert_allclose(
        centred(PROMPTS, RESPONSES) - total(PROMPTS, RESPONSES), -centred.offset, atol=1e-6
    )


def test_reward_from_config(assets):
    root, tokenizer, _, models = assets
    directory = str(models[0][0])
    spec = {
        "terms": [{"model": directory, "weight": 0.5}, {"rule": "language_match", "weight": 2.0}],
        "offset": 1.5,
    }
    built = reward_from_config(spec, str(root / "tok.model"))
    direct = 0.5 * ModelReward(directory, tokenizer)(PROMPTS, RESPONSES)
    direct += 2.0 * RuleReward("language_match")(PROMPTS, RESPONSES) - 1.5
    np.testing.assert_allclose(built(PROMPTS, RESPONSES), direct, atol=1e-5)
    ensemble = reward_from_config(
        {"terms": [{"ensemble": [str(d) for d, _ in models]}]}, str(root / "tok.model")
    )
    assert ensemble(PROMPTS, RESPONSES).shape == (5,)
    assert reward_from_config("language_match", None)(PROMPTS, RESPONSES)[0] == 1.0
    with pytest.raises(KeyError, match="weigth"):
        reward_from_config({"terms": [{"rule": "language_match", "weigth": 2}]}, None)
    with pytest.raises(ValueError, match=r"reward.terms\[0\]: name exactly one"):
        reward_from_config({"terms": [{"rule": "language_match", "model": directory}]}, None)
    with pytest.raises(KeyError, match="unknown rule reward 'languag'"):
        reward_from_config("languag", None)
    with pytest.raises(ValueError, match="carries no tokenizer"):
        reward_from_config({"terms": [{"model": directory}]}, None)
    with pytest.raises(FileNotFoundError, match=r"head\.safetensors"):
        reward_from_config({"terms": [{"model": str(root)}]}, str(root / "tok.model"))


def test_score_rollouts_decodes_sampled_rows_without_stop_or_padding(assets):
    # Given sampled rows [5, t]: a response, <end_of_turn> (but not in row 1, cut at the
    # length), then padding; row 3 has tokens past its length that must not be read,
    _, tokenizer, _, _ = assets
    ids = [tokenizer.encode(response) for response in RESPONSES]
    width = max(map(len, ids)) + 4
    rows = np.full((5, width), PAD_ID, np.int32)
    lengths = np.zeros(5, np.int32)
    for i, row in enumerate(ids):
        tail = [] if i == 1 else [END_OF_TURN_ID]
        rows[i, : len(row) + len(tail)] = row + tail
        lengths[i] = len(row) + len(tail)
    rows[3, lengths[3] :] = tokenizer.encode("Tell me about trains.")[: width - lengths[3]]
    rule = RuleReward("language_match")

    # when they are scored in one call, then the reward sees the texts alone,
    texts = decode_responses(tokenizer, rows, lengths)
    assert texts == [tokenizer.decode(row) for row in ids]
    assert not any("<end_of_turn>" in text for text in texts)
    scores = score_rollouts(rule, tokenizer, PROMPTS, rows, lengths)
    np.testing.assert_array_equal(scores, rule(PROMPTS, texts))
    np.testing.assert_array_equal(scores, [1, 1, 0, 0, 1])
    assert scores.dtype == np.float32

    # and a reward of the wrong shape, or a non-finite one, fails naming the reward.
    def first_pair_only(prompts, responses):
        return rule(prompts[:1], responses[:1])

    with pytest.raises(ValueError, match=r"first_pair_only returned shape \(1,\), expected \(5,\)"):
        score_rollouts(first_pair_only, tokenizer, PROMPTS, rows, lengths)
    broken = Recentred(rule, offset=float("inf"))
    with pytest.raises(
        ValueError,
        match=r"Recentred\(RuleReward\('language_match'\), offset=inf\) returned a non-finite "
        r"reward -inf for pair 0 \(5 of 5\)",
    ):
        score_rollouts(broken, tokenizer, PROMPTS, rows, lengths)
    with pytest.raises(ValueError, match=r"lengths \(4,\)"):
        score_rollouts(rule, tokenizer, PROMPTS, rows, lengths[:4])
