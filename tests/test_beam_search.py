"""Beam search: width 1 is greedy, an exhaustive width finds the brute-force optimum, batching
changes nothing, and scores use the ((5 + L) / 6)^alpha length penalty."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from posttrain.models import forward, get_preset, init_params
from posttrain.sampling import SamplingConfig, sample
from posttrain.sampling.beam_search import beam_search

VOCAB, STOP, MAX_NEW = 5, 1, 3
CONFIG = get_preset("tiny_gemma2", vocab_size=VOCAB, sliding_window=4)
_forward = jax.jit(forward, static_argnums=0)
PROMPTS = [[2, 3, 4, 0, 3, 2], [4, 4], [3, 2, 3, 4]]


@pytest.fixture(scope="module")
def params():
    # Large embeddings make the tiny model's distributions peaked, so choices matter.
    params = init_params(CONFIG, jax.random.key(5))
    params["embedder"]["input_embedding"] *= 6.0
    return params


def _log_prob(params, prompt, continuation):
    sequence = jnp.asarray([list(prompt) + list(continuation)])
    log_probs = jax.nn.log_softmax(_forward(CONFIG, params, sequence)[0], -1)
    steps = range(len(prompt) - 1, len(prompt) - 1 + len(continuation))
    return float(sum(log_probs[t, tok] for t, tok in zip(steps, continuation, strict=True)))


def _brute_force(params, prompt, alpha):
    """Best (score, continuation) over all stop-terminated or full-length continuations."""
    best = None
    for length in range(1, MAX_NEW + 1):
        for continuation in itertools.product(range(VOCAB), repeat=length):
            if STOP in continuation[:-1] or (length < MAX_NEW and continuation[-1] != STOP):
                continue
            score = _log_prob(params, prompt, continuation) / ((5 + length) / 6) ** alpha
            if best is None or score > best[0]:
                best = (score, continuation)
    return best


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_exhaustive_width_equals_brute_force(params, alpha):
    out = beam_search(
        CONFIG,
        params,
        PROMPTS[:2],
        width=VOCAB**MAX_NEW,
        max_new_tokens=MAX_NEW,
        alpha=alpha,
        stop_ids=(STOP,),
    )
    for row, prompt in enumerate(PROMPTS[:2]):
        score, continuation = _brute_force(params, prompt, alpha)
        length = int(out.lengths[row, 0])
        assert tuple(int(t) for t in out.tokens[row, 0, :length]) == continuation
        assert float(out.scores[row, 0]) == pytest.approx(score, abs=1e-4)


def test_scores_are_normalised_log_probs(params):
    out = beam_search(
        CONFIG, params, PROMPTS, width=4, max_new_tokens=MAX_NEW, alpha=0.6, stop_ids=(STOP,)
    )
    for row, prompt in enumerate(PROMPTS):
        scores = np.asarray(out.scores[row])
        assert np.all(np.diff(scores) <= 1e-6)  # best first
        for beam in range(4):
            length = int(out.lengths[row, beam])
            continuation = [int(t) for t in out.tokens[row, beam, :length]]
            log_p = _log_prob(params, prompt, continuation)
            assert float(out.log_probs[row, beam]) == pytest.approx(log_p, abs=1e-4)
            assert scores[beam] == pytest.approx(log_p / ((5 + length) / 6) ** 0.6, abs=1e-4)


def test_width_one_is_greedy_without_stop_tokens(params):
    out = beam_search(CONFIG, params, PROMPTS, width=1, max_new_tokens=6, stop_ids=())
    greedy = sample(CONFIG, params, PROMPTS, SamplingConfig(6, temperature=0.0, stop_ids=(-1,)))
    np.testing.assert_array_equal(out.tokens[:, 0], greedy.tokens)


def test_batch_equals_one_by_one(params):
    batched = beam_search(CONFIG, params, PROMPTS, width=3, max_new_tokens=4, stop_ids=(STOP,))
    for row, prompt in enumerate(PROMPTS):
        alone = beam_search(CONFIG, params, [prompt], width=3, max_new_tokens=4, stop_ids=(STOP,))
        np.testing.assert_array_equal(batched.tokens[row], alone.tokens[0])
        np.testing.assert_allclose(batched.scores[row], alone.scores[0], atol=1e-5)


def test_early_stopping_keeps_the_best(params):
    kwargs = dict(width=3, max_new_tokens=MAX_NEW + 2, stop_ids=(STOP,))
    early = beam_search(CONFIG, params, PROMPTS, early_stop=True, **kwargs)
    full = beam_search(CONFIG, params, PROMPTS, early_stop=False, **kwargs)
    np.testing.assert_array_equal(early.tokens[:, 0], full.tokens[:, 0])
    np.testing.assert_allclose(early.scores[:, 0], full.scores[:, 0], atol=1e-6)


def test_bucket_filling_prompt_to_max_new_tokens_scores_equal_full_forward(params):
    # The first prompt fills its 16-token bucket and no stop id exists, so every hypothesis
    # runs to max_new_tokens and the last decode steps read the highest RoPE positions. Same
    # shapes and settings as test_width_one_is_greedy_without_stop_tokens: one compilation.
    prompts = [[2, 3, 4, 0, 3, 2, 4, 4, 3, 2, 3, 4, 0, 2, 3, 4], *PROMPTS[1:]]
    new, penalty = 6, ((5 + 6) / 6) ** 0.6
    out = beam_search(CONFIG, params, prompts, width=1, max_new_tokens=new, stop_ids=())
    np.testing.assert_array_equal(out.lengths, new)
    # Given the final sequences right-padded into one batch (segment 0 after the end), when one
    # full forward scores them, then each continuation's summed log p is the beam's.
    width = len(prompts[0]) + new
    tokens, segments = np.zeros((3, width), np.int32), np.zeros((3, width), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt) + new] = [*prompt, *np.asarray(out.tokens[row, 0])]
        segments[row, : len(prompt) + new] = 1
    log_probs = jax.nn.log_softmax(_forward(CONFIG, params, tokens, segment_ids=segments), -1)
    for row, prompt in enumerate(prompts):
        steps = np.arange(len(prompt) - 1, len(prompt) - 1 + new)
        log_p = float(np.sum(log_probs[row, steps, tokens[row, steps + 1]]))
        assert float(out.log_probs[row, 0]) == pytest.approx(log_p, abs=1e-4)
        assert float(out.scores[row, 0]) == pytest.approx(log_p / penalty, abs=1e-4)
