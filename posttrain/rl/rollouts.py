"""Rollouts: the on-policy batch source of the RL stages.

Each call of `next_batch(state)` takes the next `p` prompts of a seeded order, samples `k`
responses to each from the CURRENT policy (`state.params`; each prompt prefilled once, its cache
continued by its k rows), scores them with a reward of the reward API (text in, float32 out),
and lays every (prompt, response) out as one right-padded training row with the per-token
log-probabilities the loss needs besides the policy's own: under the reference (a frozen tree,
or the EMA anchor the train state carries) and under the anchor of BOND-style losses.

The position (prompt order: epoch and index; sampler RNG: the number of batches drawn) is JSON
and goes into every checkpoint, so a resumed run draws exactly the rollouts it would have drawn.

Which policy drew the samples: the sampler draws from the model's distribution transformed by
temperature / top-k / top-p. The estimators of `posttrain.losses` need the log-probs of the
policy that drew the samples, so the RL stages sample at temperature 1 without truncation by
default, where the two coincide; `sampler_log_probs` holds the sampler's model log-probs and
`sampler_gap` in the stage's metrics reports their distance to the training forward's.

`EpochRollouts` uses each drawn batch for several optimizer steps (off-policy epochs) and keeps
the batch in the train state, so that a run resumed between two passes goes on with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from posttrain.losses.log_probs import sequence_token_log_probs
from posttrain.models import BackboneConfig
from posttrain.rewards.api import RewardFunction, decode_responses, score_rollouts
from posttrain.sampling.prompting import encode_prompt
from posttrain.sampling.sampler import SamplingConfig, bucket_length, generate, left_pad
from posttrain.tokenizer import PAD_ID, GemmaTokenizer

Array = jax.Array
Params = Any


class RolloutBatch(NamedTuple):
    """Rows [b = p·k, ...], prompt-major (row i·k + j: prompt i, sample j); positions along the
    row axis t are next-token targets (row t predicts token t + 1)."""

    tokens: np.ndarray  # [b, T] prompt then response, right-padded
    segments: np.ndarray  # [b, T] 1 on real tokens, 0 on padding
    response_mask: np.ndarray  # [b, T-1] True where the target is a response token
    rewards: np.ndarray  # [b] float32
    reference_log_probs: np.ndarray  # [b, T-1] float32 under the reference (0 off the mask)
    sampler_log_probs: np.ndarray  # [b, T-1] the sampler's model log-probs, aligned the same way
    lengths: np.ndarray  # [b] response tokens, the stop token included
    # [b, T-1] π_old's log-probs by the training forward, 0 off the mask (EpochRollouts only)
    behaviour_log_probs: np.ndarray | None = None


class RolloutSource:
    """An on-policy batch source (`posttrain.train.loop.OnPolicySource`) of rollouts."""

    def __init__(
        self,
        config: BackboneConfig,
        tokenizer: GemmaTokenizer,
        prompts: Sequence[Any],
        reward: RewardFunction,
        sampling: SamplingConfig,
        prompts_per_step: int,
        samples_per_prompt: int,
        reference: Callable[[Any], Params],
        seed: int = 0,
        chat: bool = True,
        chunk_size: int = 8192,
    ) -> None:
        if len(prompts) < prompts_per_step:
            raise ValueError(f"{len(prompts)} prompts cannot fill a batch of {prompts_per_step}")
        self.config, self.tokenizer, self.reward = config, tokenizer, reward
        self.prompts = list(prompts)
        self.encoded = [encode_prompt(tokenizer, prompt, chat) for prompt in self.prompts]
        # One prompt width (the sampler's left-padded prefill) and one training row width for
        # the whole run: one compiled sampler and one training shape.
        longest = max(len(ids) for ids in self.encoded)
        self.prompt_width = bucket_length(longest)
        self.row_width = row_width(longest, self.prompt_width, sampling.max_new_tokens)
        self.sampling = sampling
        self.p, self.k = prompts_per_step, samples_per_prompt
        self.reference = reference
        self.seed, self.epoch, self.index, self.draws = seed, 0, 0, 0
        self.chunk_size = chunk_size
        self.seconds: dict[str, float] = {}
        self.last_responses: list[str] = []
        self.last_prompts: list[Any] = []
        self.last_rewards = np.zeros(0, np.float32)

    # -- position -------------------------------------------------------------------------
    def state(self) -> dict[str, int]:
        """Prompt order and sampler RNG position, for the checkpoint."""
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index, "draws": self.draws}

    def restore(self, position: dict[str, int]) -> None:
        """Continue from a stored position."""
        if position["seed"] != self.seed:
            raise ValueError(f"checkpoint rollout seed {position['seed']} differs from {self.seed}")
        self.epoch, self.index, self.draws = position["epoch"], position["index"], position["draws"]

    def _next_prompts(self) -> list[int]:
        if self.index + self.p > len(self.prompts):  # drop the ragged tail of an epoch
            self.epoch, self.index = self.epoch + 1, 0
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.prompts))
        picked = order[self.index : self.index + self.p]
        self.index += self.p
        return [int(i) for i in picked]

    # -- the batch ------------------------------------------------------------------------
    def draw(self, params: Params, picked: list[int], k: int, rng: Array) -> dict[str, Any]:
        """k samples of each picked prompt from `params` (one prefill per prompt), rewarded and
        laid out as training rows: tokens, segments, mask, sampler log-probs, rewards, lengths."""
        tokens, segments = left_pad([self.encoded[i] for i in picked], self.prompt_width)
        out = generate(
            self.config,
            params,
            jnp.asarray(tokens),
            jnp.asarray(segments),
            rng,
            jnp.asarray(self.sampling.temperature, jnp.float32),
            jnp.asarray(self.sampling.top_k, jnp.int32),
            jnp.asarray(self.sampling.top_p, jnp.float32),
            max_new_tokens=self.sampling.max_new_tokens,
            stop_ids=tuple(self.sampling.stop_ids),
            samples_per_prompt=k,
        )
        response, lengths, model_log_probs = jax.device_get(
            (out.tokens, out.lengths, out.model_log_probs)
        )
        generated = time.perf_counter()
        prompts = [self.prompts[i] for i in picked for _ in range(k)]
        rewards = score_rollouts(
            self.reward, self.tokenizer, prompts, response, lengths, self.sampling.stop_ids
        )
        self.seconds["scoring"] = self.seconds.get("scoring", 0.0) + time.perf_counter() - generated
        prompt_ids = [self.encoded[i] for i in picked for _ in range(k)]
        rows = training_rows(prompt_ids, response, lengths, model_log_probs, self.row_width)
        self.last_prompts, self.last_rewards = prompts, rewards
        self.last_responses = decode_responses(
            self.tokenizer, response, lengths, self.sampling.stop_ids
        )
        return dict(
            tokens=rows[0],
            segments=rows[1],
            response_mask=rows[2],
            sampler_log_probs=rows[3],
            rewards=rewards,
            lengths=lengths.astype(np.int32),
        )

    def token_log_probs(self, params: Params, rows: dict[str, Any]) -> np.ndarray:
        """Per-target log-probs [b, T-1] of rows under `params`, 0 off the response mask."""
        started = time.perf_counter()
        tokens, segments = rows["tokens"], rows["segments"]
        # Sliced on the host: every source of one config (the stage's, the Best-of-N probe's,
        # J-BOND's anchor) then shares the one compiled scorer.
        values = sequence_token_log_probs(
            self.config,
            params,
            tokens[:, :-1],
            tokens[:, 1:],
            segments[:, :-1],
            self.chunk_size,
        )
        values = np.where(rows["response_mask"], np.asarray(values), 0.0).astype(np.float32)
        self.seconds["reference"] = self.seconds.get("reference", 0.0) + (
            time.perf_counter() - started
        )
        return values

    def next_key(self) -> Array:
        """The sampler key of the next batch (from the seed and the number of batches drawn)."""
        key = jax.random.fold_in(jax.random.key(self.seed), self.draws)
        self.draws += 1
        return key

    def next_batch(self, state: Any) -> RolloutBatch:
        """Rollouts of the current policy, rewarded and laid out as training rows."""
        picked = self._next_prompts()
        self.seconds = {}
        started = time.perf_counter()
        rows = self.draw(state.params, picked, self.k, self.next_key())
        total = time.perf_counter() - started
        reference = self.token_log_probs(self.reference(state), rows)
        self.seconds["generation"] = total - self.seconds["scoring"]
        return RolloutBatch(reference_log_probs=reference, **rows)


class EpochRollouts:
    """An on-policy source that uses each batch of `source` for `epochs` optimizer steps.

    The batch in use and the index of the pass made on it live in the train state's extras
    (`rollout`, `pass`), which every checkpoint holds, and `carry` puts them there before each
    step. So a run resumed between two passes goes on with the batch it had, instead of drawing
    a new one from the changed policy, and the source's position (advanced once per draw) is
    the drawing step's. Each new batch gets `behaviour_log_probs`, π_old of a clipped ratio:
    the drawing policy's log-probs by the training forward, not the sampler's, because a
    sequence ratio sums the per-token sampler gap. A step that was not finite (the loop asks
    again for the same step) drops the rest of its batch: its passes would repeat the same
    numbers. Everything else (prompts, seconds, last samples) is the drawing source's.
    """

    def __init__(self, source: RolloutSource, epochs: int) -> None:
        self.source, self.epochs = source, epochs
        self._served: int | None = None  # the step of the last batch handed out
        self._fresh = False  # whether that batch was drawn for it

    def __getattr__(self, name: str) -> Any:
        if name == "source":  # not set yet (copying, unpickling)
            raise AttributeError(name)
        return getattr(self.source, name)

    def initial_extras(self) -> dict[str, Any]:
        """The extras' `rollout` (zeros of the run's shapes: the checkpoint's template) and
        `pass` (all passes on it made, so the first step draws)."""
        rows = self.source.p * self.source.k
        width = self.source.row_width
        per_target = np.zeros((rows, width - 1), np.float32)
        rollout = RolloutBatch(
            tokens=np.zeros((rows, width), np.int32),
            segments=np.zeros((rows, width), np.int32),
            response_mask=np.zeros((rows, width - 1), bool),
            rewards=np.zeros(rows, np.float32),
            reference_log_probs=per_target,
            sampler_log_probs=per_target,
            lengths=np.zeros(rows, np.int32),
            behaviour_log_probs=per_target,
        )
        return {"rollout": rollout._asdict(), "pass": np.int32(self.epochs - 1)}

    def state(self) -> dict[str, int]:
        """The drawing source's position."""
        return self.source.state()

    def restore(self, position: dict[str, int]) -> None:
        """Continue the drawing source from a stored position."""
        self.source.restore(position)

    def next_batch(self, state: Any) -> RolloutBatch:
        """The state's batch again while it has passes left, else new rollouts with π_old."""
        step = int(state.step)
        retried = step == self._served
        self._served = step
        self._fresh = retried or int(state.extras["pass"]) + 1 >= self.epochs
        if not self._fresh:
            self.source.seconds = dict.fromkeys(("generation", "scoring", "reference"), 0.0)
            return RolloutBatch(**jax.device_get(state.extras["rollout"]))
        batch = self.source.next_batch(state)
        behaviour = self.source.token_log_probs(state.params, batch._asdict())
        return batch._replace(behaviour_log_probs=behaviour)

    def carry(self, state: Any, batch: RolloutBatch) -> Any:
        """`state` with the batch of its next step and that step's pass index in the extras
        (host arrays: the caller places them)."""
        index = 0 if self._fresh else int(state.extras["pass"]) + 1
        extras = {**state.extras, "rollout": batch._asdict(), "pass": np.int32(index)}
        return state._replace(extras=extras)


ROW_ALIGN = 16  # training row widths are multiples of this (or the sampler's full width)


def row_width(longest_prompt: int, prompt_width: int, max_new_tokens: int) -> int:
    """The training row width T of a run: its longest prompt plus `max_new_tokens`, rounded up
    to a multiple of ROW_ALIGN, and never wider than the sampler's `prompt_width` plus them.

    Rows are right-padded `prompt ; response`, so the sampler's left padding (prompt lengths
    round up to a power of two) need not be carried: on the language-fix recipe's prompts
    (at most 37 tokens, 24 new) T is 64, not 88, and a REINFORCE step is 1.47x faster
    (experiments/bench/rl/ROW_WIDTH_RESULTS.md)."""
    aligned = -(-(longest_prompt + max_new_tokens) // ROW_ALIGN) * ROW_ALIGN
    return min(aligned, prompt_width + max_new_tokens)


def training_rows(
    prompt_ids: Sequence[Sequence[int]],
    response: np.ndarray,
    lengths: np.ndarray,
    model_log_probs: np.ndarray,
    width: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, segments [b, T], response mask, sampler log-probs [b, T-1]) of right-padded rows
    `prompt ; response[:length]`, T = `width` (at least the longest prompt plus the response
    tokens [b, max_new_tokens])."""
    rows, new = len(prompt_ids), response.shape[1]
    longest = max((len(ids) for ids in prompt_ids), default=0)
    if longest + new > width:
        raise ValueError(f"rows of {longest} prompt and {new} response tokens exceed width {width}")
    tokens = np.full((rows, width), PAD_ID, np.int32)
    segments = np.zeros((rows, width), np.int32)
    mask = np.zeros((rows, width - 1), bool)
    sampler = np.zeros((rows, width - 1), np.float32)
    for row, (ids, n) in enumerate(zip(prompt_ids, lengths, strict=True)):
        start, n = len(ids), int(n)
        tokens[row, :start] = ids
        tokens[row, start : start + n] = response[row, :n]
        segments[row, : start + n] = 1
        # Target t is token t + 1: the response's tokens are targets start - 1 ... start + n - 2.
        mask[row, start - 1 : start + n - 1] = True
        sampler[row, start - 1 : start + n - 1] = model_log_probs[row, :n]
    return tokens, segments, mask, sampler
