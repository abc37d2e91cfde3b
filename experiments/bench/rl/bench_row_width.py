"""RL step seconds at the trimmed training row width against the sampler's full width.

The language-fix recipe's REINFORCE shapes: tiny_gemma2 (vocabulary 1000), 16 prompts x 4
samples, 24 new tokens, per-token KL; prompts of 12-37 tokens, so the sampler's left-padded
prompt width is 64 and the rows were 64 + 24 = 88 wide, where `row_width` makes them 64. Both
sides run in this one process, interleaved, on the same prompts and policy, and the report is
their ratio (the machine's speed cancels).

    .venv/bin/python experiments/bench/rl/bench_row_width.py
"""

from __future__ import annotations

import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from experiments.bench.common import cpu_name, package_versions, prepend_results
from experiments.bench.rl.bench_rl import IdTokenizer

RESULTS = Path(__file__).with_name("ROW_WIDTH_RESULTS.md")
PROMPTS, SAMPLES, NEW_TOKENS, VOCAB = 16, 4, 24, 1000
WARM, TIMED, ROUNDS = 2, 10, 3


def main() -> None:
    """Time both widths, interleaved, and prepend the results."""
    import jax
    import jax.numpy as jnp

    from posttrain.models import get_preset, init_params
    from posttrain.rl.rollouts import RolloutSource
    from posttrain.sampling.sampler import SamplingConfig
    from posttrain.stages.reinforce import ReinforceConfig, reinforce_loss_terms, update_extras_fn
    from posttrain.train.optim import OptimConfig, make_optimizer
    from posttrain.train.step import init_state, make_train_step

    config = get_preset("tiny_gemma2", vocab_size=VOCAB)
    rng = np.random.default_rng(0)
    lengths = [37, *rng.integers(12, 30, 255)]  # the recipe's: median 19, longest 37
    texts = [" ".join(map(str, rng.integers(3, VOCAB, n - 1))) for n in lengths]
    stage = ReinforceConfig(
        init_checkpoint="",
        prompts="",
        reward=None,
        prompts_per_step=PROMPTS,
        samples_per_prompt=SAMPLES,
        beta=0.5,
        per_token_kl=True,
        max_new_tokens=NEW_TOKENS,
    )
    params = init_params(config, jax.random.key(0))
    reference = jax.tree.map(jnp.copy, params)
    optimizer = make_optimizer(OptimConfig(lr=5e-4, schedule="constant", total_steps=1000))
    step = make_train_step(
        reinforce_loss_terms(config, stage),
        optimizer,
        uses_extras=True,
        update_extras=update_extras_fn(stage),
    )

    def side(full_width: bool) -> tuple[RolloutSource, object]:
        source = RolloutSource(
            config,
            IdTokenizer(eos=VOCAB + 1),
            texts,
            lambda prompts, responses: np.asarray([len(r) % 7 for r in responses], np.float32),
            SamplingConfig(max_new_tokens=NEW_TOKENS, stop_ids=()),
            PROMPTS,
            SAMPLES,
            lambda state: reference,
            chat=False,
        )
        if full_width:
            source.row_width = source.prompt_width + NEW_TOKENS  # the layout before row_width
        own = jax.tree.map(jnp.copy, params)  # the step donates its state
        state = init_state(own, optimizer, 0, {"baseline": jnp.zeros((), jnp.float32)})
        return source, state

    sides = {"trimmed": side(False), "full": side(True)}
    widths = {name: source.row_width for name, (source, _) in sides.items()}
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for round_index in range(ROUNDS):
        for name, (source, state) in sides.items():
            for i in range(WARM + TIMED):
                started = time.perf_counter()
                batch = source.next_batch(state)
                state, metrics = step(state, batch)
                jax.device_get(metrics)
                if i >= WARM:
                    seconds[name].append(time.perf_counter() - started)
            sides[name] = (source, state)
        print(f"round {round_index + 1}: " + ", ".join(
            f"{n} {statistics.median(s[-TIMED:]):.3f}" for n, s in seconds.items()))  # fmt: skip
    trimmed, full = (statistics.median(seconds[n]) for n in ("trimmed", "full"))
    header = "# RL step seconds: trimmed training rows against the sampler's full width\n\n"
    section = "\n".join(
        [
            f"## {datetime.date.today()} — CPU, float32, tiny_gemma2 (vocabulary {VOCAB}), "
            f"{PROMPTS} prompts x {SAMPLES} samples, prompts 12-37 tokens, {NEW_TOKENS} new",
            "",
            f"- machine: {cpu_name()}, Python {platform.python_version()}",
            f"- versions: {package_versions(('jax', 'jaxlib', 'flax'))}",
            f"- step = rollouts (sampling, stand-in reward, reference) + the reinforce update; "
            f"median of {ROUNDS} x {TIMED} steps after {WARM} warm-up steps per round, the two "
            "sides interleaved in one process",
            "- command: `.venv/bin/python experiments/bench/rl/bench_row_width.py`",
            "",
            "| rows | width | s/step |",
            "|---|---|---|",
            f"| trimmed (`row_width`) | {widths['trimmed']} | {trimmed:.3f} |",
            f"| sampler's full width | {widths['full']} | {full:.3f} |",
            "",
            f"Full / trimmed: **{full / trimmed:.2f}x**.",
            "",
        ]
    )
    prepend_results(RESULTS, header, section)
    print(section)


if __name__ == "__main__":
    main()
