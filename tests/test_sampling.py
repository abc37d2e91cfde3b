"""The batched KV-cache sampler: exact greedy, exact log-probs, batching, distribution, and
no recompilation when sampling settings change."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from posttrain.models import forward, get_preset, init_params
from posttrain.sampling import SamplingConfig, process_logits, sample
from posttrain.sampling import sampler as sampler_module
from posttrain.sampling.processors import first_argmax

CONFIG = get_preset("tiny_gemma2", sliding_window=6)
_forward = jax.jit(forward, static_argnums=0)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [20, 21, 22], [30, 31, 32, 33, 34, 35]]
NEW = 20  # with prompts of 3..11 tokens, generation runs well past the window of 6


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


def _full_log_probs(params, prompt, generated):
    sequence = jnp.asarray([list(prompt) + [int(t) for t in generated]])
    log_probs = jax.nn.log_softmax(_forward(CONFIG, params, sequence)[0], axis=-1)
    return log_probs[len(prompt) - 1 : -1]  # predictions of the generated tokens


def test_greedy_equals_full_forward_argmax_and_log_probs(params):
    greedy = SamplingConfig(max_new_tokens=NEW, temperature=0.0, stop_ids=(1,))
    out = sample(CONFIG, params, PROMPTS, greedy)
    assert out.tokens.shape == (3, NEW)
    for row, prompt in enumerate(PROMPTS):
        length = int(out.lengths[row])
        generated = out.tokens[row, :length]
        log_probs = _full_log_probs(params, prompt, generated)
        np.testing.assert_array_equal(generated, jnp.argmax(log_probs, axis=-1))
        chosen = log_probs[jnp.arange(length), generated]
        np.testing.assert_allclose(out.model_log_probs[row, :length], chosen, atol=1e-5)


def test_sampled_log_probs_equal_full_forward(params):
    config = SamplingConfig(max_new_tokens=NEW, temperature=0.8, top_p=0.9, seed=3)
    out = sample(CONFIG, params, PROMPTS, config)
    for row, prompt in enumerate(PROMPTS):
        length = int(out.lengths[row])
        generated = out.tokens[row, :length]
        log_probs = _full_log_probs(params, prompt, generated)
        np.testing.assert_allclose(
            out.model_log_probs[row, :length], log_probs[jnp.arange(length), generated], atol=1e-5
        )
        # Under the sampling policy the chosen tokens are never filtered out.
        assert np.all(np.isfinite(out.policy_log_probs[row, :length]))
        assert np.all(out.policy_log_probs[row, :length] <= 0)


def test_mixed_lengths_batch_equals_one_by_one(params):
    greedy = SamplingConfig(max_new_tokens=NEW, temperature=0.0, stop_ids=(1,))
    batched = sample(CONFIG, params, PROMPTS, greedy)
    for row, prompt in enumerate(PROMPTS):
        alone = sample(CONFIG, params, [prompt], greedy)
        np.testing.assert_array_equal(batched.tokens[row], alone.tokens[0])
        np.testing.assert_allclose(
            batched.model_log_probs[row], alone.model_log_probs[0], atol=1e-5
        )


def test_top_k_one_equals_greedy(params):
    greedy = sample(CONFIG, params, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0.0))
    top1 = sample(
        CONFIG, params, PROMPTS, SamplingConfig(max_new_tokens=8, temperature=1.3, top_k=1)
    )
    np.testing.assert_array_equal(greedy.tokens, top1.tokens)


def test_stops_at_stop_token_and_pads_after(params):
    # Make the greedy first token a stop id for the first prompt.
    first = int(
        sample(CONFIG, params, PROMPTS[:1], SamplingConfig(1, temperature=0.0)).tokens[0, 0]
    )
    out = sample(
        CONFIG,
        params,
        PROMPTS,
        SamplingConfig(max_new_tokens=6, temperature=0.0, stop_ids=(first,)),
    )
    assert bool(out.finished[0]) and int(out.lengths[0]) == 1
    np.testing.assert_array_equal(out.tokens[0, 1:], 0)
    np.testing.assert_array_equal(out.model_log_probs[0, 1:], 0)


def test_first_token_frequencies_match_softmax(params):
    # Chi-square test of 4000 first tokens at temperature 0.7 against the tempered softmax.
    prompt = PROMPTS[1]
    draws = 4000
    config = SamplingConfig(max_new_tokens=1, temperature=0.7, seed=11)
    out = sample(CONFIG, params, [prompt] * draws, config)
    logits = _forward(CONFIG, params, jnp.asarray([prompt]))[0, -1]
    probs = np.asarray(jax.nn.softmax(logits / 0.7), np.float64)
    # Pool rare tokens so that every cell expects at least 5 draws.
    order = np.argsort(-probs)
    common = order[probs[order] * draws >= 5]
    counts = np.bincount(np.asarray(out.tokens[:, 0]), minlength=probs.size)
    observed = np.append(counts[common], draws - counts[common].sum())
    expected = np.append(probs[common], 1 - probs[common].sum()) * draws
    assert len(common) >= 10
    _, p_value = stats.chisquare(observed, expected)
    assert p_value > 1e-3


def test_settings_change_does_not_recompile(params):
    base = SamplingConfig(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=10)
    sample(CONFIG, params, PROMPTS, base)
    before = sampler_module.trace_count
    for temperature, top_p, top_k in [(0.3, 0.5, 0), (1.5, 1.0, 3), (0.0, 0.2, 50)]:
        settings = SamplingConfig(5, temperature=temperature, top_p=top_p, top_k=top_k)
        sample(CONFIG, params, PROMPTS, settings)
    # Prompts of other lengths in the same bucket reuse the compilation too.
    sample(CONFIG, params, [[3, 4], [5] * 16, [6] * 9], base)
    assert sampler_module.trace_count == before


def test_process_logits_top_k_and_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda k, p: np.isfinite(process_logits(logits, 1.0, k, p))[0].tolist()  # noqa: E731
    assert kept(2, 1.0) == [True, True, False, False]
    assert kept(0, 0.5) == [True, False, False, False]  # 0.5 reaches p with the first token
    assert kept(0, 0.7) == [True, True, False, False]
    assert kept(0, 0.96) == [True, True, True, True]
    assert kept(3, 0.96) == [True, True, True, False]


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)


def _sorted_reference(logits, k, p):
    """Top-k then top-p by a full sort (numpy float64 masses), the textbook way."""
    out = np.full_like(logits, -np.inf)
    for row, values in enumerate(logits):
        order = np.argsort(-values, kind="stable")
        keep = order[: k if 0 < k < values.size else values.size]
        probs = np.exp(values[keep] - values[keep].max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        keep = keep[before < p]
        threshold = values[keep].min()
        out[row] = np.where(values >= threshold, values, -np.inf)
    return out


@pytest.mark.parametrize(("k", "p"), [(0, 0.9), (5, 1.0), (7, 0.6), (0, 0.05), (300, 0.999)])
def test_bisection_filters_equal_a_full_sort(k, p):
    logits = np.asarray(jax.random.normal(jax.random.key(k), (6, 257)) * 3, np.float32)
    got = np.asarray(process_logits(jnp.asarray(logits), 1.0, k, p))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(_sorted_reference(logits, k, p)))


def test_first_argmax_equals_argmax_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, (64, 50)).astype(np.float32)  # many ties: the first index must win
    x[3] = -np.inf
    np.testing.assert_array_equal(first_argmax(jnp.asarray(x)), np.argmax(x, axis=-1))


def test_gumbel_noise_has_gumbel_moments_and_fresh_draws_each_step():
    # Standard Gumbel: mean is the Euler-Mascheroni constant, variance pi^2 / 6.
    state = jax.random.bits(jax.random.key(3), (4,), jnp.uint32)
    state, first = sampler_module._gumbel_noise(state, (64, 1024))
    _, second = sampler_module._gumbel_noise(state, (64, 1024))
    for noise in (np.asarray(first, np.float64), np.asarray(second, np.float64)):
        assert abs(noise.mean() - np.euler_gamma) < 0.02
        assert abs(noise.var() - np.pi**2 / 6) < 0.06
    # The next step draws new noise, not a copy of this one.
    assert abs(np.corrcoef(np.ravel(first), np.ravel(second))[0, 1]) < 0.02


def test_bucket_filling_prompt_to_max_new_tokens_equals_full_forward(params):
    # The first prompt fills its 16-token bucket and no row stops, so the decode loop reaches
    # the highest position it ever feeds (bucket + max_new_tokens - 1): a RoPE position bound
    # below that would change the last log-probs (or make them NaN). Same shapes and settings
    # as test_sampled_log_probs_equal_full_forward, so the compilation is shared.
    prompts = [list(range(40, 56)), *PROMPTS[1:]]
    assert sampler_module.bucket_length(len(prompts[0])) == len(prompts[0])
    config = SamplingConfig(max_new_tokens=NEW, temperature=0.8, top_p=0.9, seed=3)
    out = sample(CONFIG, params, prompts, config)
    np.testing.assert_array_equal(out.lengths, NEW)  # no stop id was drawn with this seed
    # Given the final sequences right-padded into one batch (segment 0 after the end), when one
    # full forward scores them, then every step's model log-prob is the forward's.
    width = len(prompts[0]) + NEW
    tokens, segments = np.zeros((3, width), np.int32), np.zeros((3, width), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt) + NEW] = [*prompt, *np.asarray(out.tokens[row])]
        segments[row, : len(prompt) + NEW] = 1
    log_probs = jax.nn.log_softmax(_forward(CONFIG, params, tokens, segment_ids=segments), axis=-1)
    for row, prompt in enumerate(prompts):
        steps = np.arange(len(prompt) - 1, len(prompt) - 1 + NEW)
        np.testing.assert_allclose(
            out.model_log_probs[row], log_probs[row, steps, tokens[row, steps + 1]], atol=1e-5
        )
