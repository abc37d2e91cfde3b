"""A tiny on-policy run with a frozen reference, an EMA anchor and a baseline (test helper).

    python tests/trainer_worker.py CHECKPOINT_DIR STEPS OUTPUT.npz [--slow]

Tabular policy over 6 outcomes: each batch samples 16 outcomes from the current policy (an
on-policy source whose position is its draw counter), the loss is REINFORCE with a KL penalty to
the frozen reference and a pull toward the EMA anchor; the baseline is a moving average of the
reward. With --slow each step sleeps, so a test can SIGKILL it between checkpoints.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from posttrain.train.checkpointing import Checkpointer
from posttrain.train.loop import run_training
from posttrain.train.step import TrainState, ema_update, init_state, make_train_step

REWARD = jnp.array([0.0, 1.0, 0.5, -1.0, 2.0, 0.2])


class Rollouts:
    """Samples outcomes from the current policy; its position is (seed, draws)."""

    def __init__(self, seed: int) -> None:
        self.seed, self.draws = seed, 0

    def next_batch(self, state: TrainState) -> jax.Array:
        key = jax.random.fold_in(jax.random.key(self.seed), self.draws)
        self.draws += 1
        return jax.random.categorical(key, state.params["logits"], shape=(16,))

    def state(self) -> dict:
        return {"seed": self.seed, "draws": self.draws}

    def restore(self, position: dict) -> None:
        self.seed, self.draws = position["seed"], position["draws"]


def loss_terms(params, actions, frozen, extras):
    log_p = jax.nn.log_softmax(params["logits"])
    log_ref = jax.nn.log_softmax(frozen["logits"])
    log_anchor = jax.nn.log_softmax(extras["anchor"]["logits"])
    taken = log_p[actions]
    shaped = REWARD[actions] - 0.1 * jax.lax.stop_gradient(taken - log_ref[actions])
    advantage = shaped - extras["baseline"]
    pull = jnp.sum(jnp.exp(log_anchor) * (log_anchor - log_p))  # KL(anchor || policy)
    loss = -jnp.sum(jax.lax.stop_gradient(advantage) * taken) + 0.05 * pull * actions.shape[0]
    return loss, jnp.float32(actions.shape[0]), {"reward": jnp.sum(REWARD[actions])}


def update_extras(extras, params, aux, frozen):
    return {
        "anchor": ema_update(extras["anchor"], params, 0.1),
        "baseline": 0.9 * extras["baseline"] + 0.1 * aux["reward"],
    }


def main() -> None:
    directory, steps, output = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    slow = "--slow" in sys.argv
    optimizer = optax.adam(0.05)
    params = {"logits": jnp.zeros(6)}
    reference = {"logits": jnp.linspace(-0.5, 0.5, 6)}
    extras = {"anchor": jax.tree.map(jnp.array, params), "baseline": jnp.zeros(())}
    state = init_state(params, optimizer, 0, extras)
    step = make_train_step(
        loss_terms, optimizer, uses_frozen=True, uses_extras=True, update_extras=update_extras
    )

    def step_fn(state, batch):
        if slow:
            time.sleep(0.3)
        return step(state, batch, reference)

    def report(step_number, metrics, state):
        print(f"step {step_number}", flush=True)

    checkpointer = Checkpointer(directory, keep=2, async_save=False)
    source = Rollouts(seed=7)
    result = run_training(state, step_fn, source, checkpointer, steps, 1, report)
    checkpointer.close()
    leaves = jax.tree.leaves(jax.device_get(result.state))
    np.savez(output, *[np.asarray(x) for x in leaves], draws=source.draws)


if __name__ == "__main__":
    main()
