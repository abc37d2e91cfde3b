"""SFT: loss masking, token-normalised accumulation, data errors, packing, the train loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from posttrain.data.prompts import DataError
from posttrain.data.sft import BatchIterator, DataConfig, build_examples, to_rows
from posttrain.data.synthetic import bilingual_corpus, reversal_rows
from posttrain.models import get_preset, init_params
from posttrain.stages.sft import sft_loss_terms
from posttrain.tokenizer import GemmaTokenizer, train_tokenizer
from posttrain.train.checkpointing import Checkpointer
from posttrain.train.loop import NonFiniteLossError, run_training
from posttrain.train.step import accumulated_gradients, init_state, make_train_step


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = bilingual_corpus(600) + [r["prompt"] + "\n" + r["response"] for r in reversal_rows(200)]
    return GemmaTokenizer(train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "t", 700))


@pytest.fixture(scope="module")
def setup(tokenizer):
    config = get_preset("tiny_gemma2", vocab_size=tokenizer.vocab_size)
    params = init_params(config, jax.random.key(0))
    data = DataConfig(train="mem", max_length=40)
    examples, _ = build_examples(reversal_rows(16, seed=3, max_digits=8), tokenizer, data, "mem")
    return config, params, to_rows(examples, 40, packing=False)


def test_prompt_labels_do_not_change_the_loss_bitwise(setup):
    config, params, rows = setup
    loss_terms = jax.jit(sft_loss_terms(config, 128))
    tokens, mask, segments = rows
    # Scramble the labels (targets) of the prompt positions; the inputs stay as they are.
    first_answer = np.argmax(mask, axis=1)
    scrambled = np.array(tokens)
    rng = np.random.default_rng(0)
    for row, start in enumerate(first_answer):
        scrambled[row, 1:start] = rng.integers(3, config.vocab_size, size=start - 1)
    assert not np.array_equal(scrambled, tokens)
    from posttrain.losses import masked_nll_sum, sequence_token_log_probs

    target_mask = mask[:, 1:] & (segments[:, 1:] == segments[:, :-1])
    base = masked_nll_sum(
        sequence_token_log_probs(config, params, tokens[:, :-1], tokens[:, 1:], segments[:, :-1]),
        target_mask,
    )
    relabelled = masked_nll_sum(
        sequence_token_log_probs(
            config, params, tokens[:, :-1], scrambled[:, 1:], segments[:, :-1]
        ),
        target_mask,
    )
    assert np.asarray(base[0]).tobytes() == np.asarray(relabelled[0]).tobytes()
    assert float(loss_terms(params, rows)[0]) == pytest.approx(float(base[0]), rel=1e-6)


def test_four_unequal_micro_batches_equal_one_batch(setup):
    config, params, rows = setup
    loss_terms = sft_loss_terms(config, 128)
    # The 16 rows have answers of 3..8 digits, so the four micro-batches hold unequal token counts.
    counts = [int(rows.loss_mask[i : i + 4].sum()) for i in range(0, 16, 4)]
    assert len(set(counts)) > 1
    one, loss_one, n_one, _ = jax.jit(accumulated_gradients, static_argnums=(0, 3))(
        loss_terms, params, rows, 1
    )
    four, loss_four, n_four, _ = jax.jit(accumulated_gradients, static_argnums=(0, 3))(
        loss_terms, params, rows, 4
    )
    assert float(n_one) == float(n_four)
    assert float(loss_four) == pytest.approx(float(loss_one), rel=1e-6)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(one))
    worst = max(
        float(jnp.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four), strict=True)
    )
    assert worst <= 1e-6 * max(scale, 1.0)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "hi"}, r"row 1 \(0-based\): missing field\(s\) \['response'\]"),
        ({"prompt": "hi", "response": 3}, r"row 1 \(0-based\): 'response' must be a string"),
        ({"prompt": "hi", "response": "  "}, r"row 1 \(0-based\): empty response"),
        (
            {"messages": [{"role": "user", "content": "hi"}]},
            r"row 1 \(0-based\): no assistant/model turn",
        ),
    ],
)
def test_malformed_rows_are_named(tokenizer, row, message):
    rows = [{"prompt": "a", "response": "b"}, row]
    with pytest.raises(DataError, match=message):
        build_examples(rows, tokenizer, DataConfig(train="train.jsonl"), "train.jsonl")
    examples, stats = build_examples(
        rows, tokenizer, DataConfig(train="x", skip_malformed=True), "train.jsonl"
    )
    assert len(examples) == 1 and stats.malformed_skipped == 1


def test_overlong_rows_are_truncated_or_dropped_and_counted(tokenizer):
    rows = [{"prompt": "short", "response": "ok"}, {"prompt": "long " * 40, "response": "x"}]
    _, stats = build_examples(rows, tokenizer, DataConfig(train="x", max_length=30), "x")
    assert stats.truncated == 1 and stats.dropped_overlong == 1  # truncation left no answer
    examples, stats = build_examples(
        rows, tokenizer, DataConfig(train="x", max_length=30, overlong="drop"), "x"
    )
    assert len(examples) == 1 and stats.dropped_overlong == 1


def test_packing_keeps_documents_apart(setup, tokenizer):
    config, params, _ = setup
    examples, _ = build_examples(
        reversal_rows(4, seed=5), tokenizer, DataConfig(train="x", max_length=40), "x"
    )
    packed = to_rows(examples, 80, packing=True)
    padded = to_rows(examples, 40, packing=False)
    assert packed.tokens.shape[0] < 4 and packed.segment_ids.max() >= 2
    loss_terms = jax.jit(sft_loss_terms(config, 128))
    packed_sum, packed_count = loss_terms(params, packed)
    padded_sum, padded_count = loss_terms(params, padded)
    assert float(packed_count) == float(padded_count)
    assert float(packed_sum) == pytest.approx(float(padded_sum), rel=1e-5)


def test_batch_iterator_resumes_in_place(setup):
    _, _, rows = setup
    first = BatchIterator(rows, 4, seed=7)
    seen = [next(first).tokens for _ in range(6)]  # crosses an epoch boundary
    second = BatchIterator(rows, 4, seed=7)
    for _ in range(3):
        next(second)
    resumed = BatchIterator(rows, 4, seed=7)
    resumed.restore(second.state())
    for expected in seen[3:]:
        np.testing.assert_array_equal(next(resumed).tokens, expected)


def _toy_training(tmp_path, poison_at=None, skip=False):
    """Least squares on a scalar, with an optional NaN batch."""
    optimizer = optax.sgd(0.1)

    def loss_terms(params, batch):
        residual = batch["x"] * params["w"] - batch["y"]
        return jnp.sum(residual**2), jnp.float32(batch["x"].size)

    class Batches:
        def __init__(self):
            self.i = 0

        def __next__(self):
            self.i += 1
            bad = poison_at is not None and self.i == poison_at
            x = jnp.full((4,), jnp.nan if bad else 1.0)
            return {"x": x, "y": jnp.full((4,), 2.0)}

        def state(self):
            return {"i": self.i}

        def restore(self, state):
            self.i = state["i"]

    checkpointer = Checkpointer(tmp_path / "ckpt", keep=2, async_save=False)
    state = init_state({"w": jnp.zeros(())}, optimizer, 0)
    step_fn = make_train_step(loss_terms, optimizer)
    return run_training(state, step_fn, Batches(), checkpointer, 10, 2, None, skip), checkpointer


def test_nan_loss_stops_with_the_last_checkpoint_intact(tmp_path):
    with pytest.raises(NonFiniteLossError, match="step 4"):
        _toy_training(tmp_path, poison_at=5)
    checkpointer = Checkpointer(tmp_path / "ckpt", async_save=False)
    assert checkpointer.latest_step() == 4


def test_nan_loss_can_be_skipped_and_counted(tmp_path):
    result, _ = _toy_training(tmp_path, poison_at=5, skip=True)
    assert result.skipped_nonfinite == 1 and int(result.state.step) == 10
    assert np.isfinite(float(result.state.params["w"]))
