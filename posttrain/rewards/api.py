"""The reward API: one callable shape for every reward the toolkit optimises or reports.

A reward function maps a batch of (prompt, response) pairs to float32 rewards [n]. Sources:
a reward-model directory (the `reward` stage's output, or the `warm` stage's weight average,
which has the same format), a prediction ensemble of several, a rule on the text (e.g. the
language check), and weighted sums of these. `Recentred` subtracts a fixed offset, usually the
mean reward of the SFT policy's own samples, so that the SFT policy scores 0 on average.

From a config (a stage's `reward` key): a rule name, or
    {terms: [{rule: language_match, weight: 1.0},
             {model: runs/warm/reward_model, preamble: "...", weight: 0.5},
             {ensemble: [dir_a, dir_b]}],
     offset: 0.0}

Sampled token rows are scored in one call with `score_rollouts` (decode, then score), and any
reward's output is checked by `score_responses`: one finite float per pair, or an error naming
the reward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np
import numpy.typing as npt

from posttrain.checkpoints.bundle import TOKENIZER_FILE, export_metadata, resolve_tokenizer
from posttrain.data.preferences import Prompt, encode_for_reward
from posttrain.rewards.reward_model import load_reward_model, reward_scores
from posttrain.rewards.rules import get_rule
from posttrain.tokenizer import END_OF_TURN_ID, EOS_ID, PAD_ID, GemmaTokenizer

LENGTH_BUCKET = 32  # inputs are padded to a multiple of this, so few shapes are compiled
# Never part of a response's text: a reward model would read `<end_of_turn>` as the turn's end.
NON_TEXT_IDS = (PAD_ID, EOS_ID, END_OF_TURN_ID)


class RewardFunction(Protocol):
    """(prompts, responses) -> rewards [n] (float32)."""

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> np.ndarray: ...


def last_user_text(prompt: Prompt) -> str:
    """The text a rule judges the prompt by: the string, or the last user turn of a chat."""
    if isinstance(prompt, str):
        return prompt
    users = [turn["content"] for turn in prompt if turn.get("role") == "user"]
    if not users:
        raise ValueError("a chat prompt needs a user turn")
    return users[-1]


class RuleReward:
    """A rule on the text of the prompt's last user turn and the response."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.rule = get_rule(name)

    def __repr__(self) -> str:
        return f"RuleReward({self.name!r})"

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> np.ndarray:
        """Rule rewards of each pair."""
        _check_lengths(prompts, responses)
        return np.asarray(
            [self.rule(last_user_text(p), r) for p, r in zip(prompts, responses, strict=True)],
            np.float32,
        )


class ModelReward:
    """A reward model directory (the reward or warm stage's `reward_model/`)."""

    def __init__(
        self,
        directory: str | Path,
        tokenizer: GemmaTokenizer | str | Path | None = None,
        preamble: str | None = None,
        batch_size: int = 16,
    ) -> None:
        """`tokenizer` and `preamble` default to the ones the directory carries (the reward and
        warm stages export them); a tokenizer that differs from the carried one is refused, and
        `preamble=""` scores without one."""
        self.directory = str(directory)
        self.config, self.params = load_reward_model(directory)
        if not isinstance(tokenizer, GemmaTokenizer):
            tokenizer = GemmaTokenizer(resolve_tokenizer(tokenizer, directory))
        self.tokenizer = tokenizer
        if self.tokenizer.vocab_size != self.config.vocab_size:
            raise ValueError(
                f"{directory}: the tokenizer has {self.tokenizer.vocab_size} pieces but the "
                f"reward model a vocabulary of {self.config.vocab_size}; they must be equal"
            )
        if preamble is None:
            preamble = export_metadata(directory).get("preamble")
        self.preamble = preamble or None
        self.batch_size = batch_size
        config = self.config
        self._score = jax.jit(lambda p, t, s: reward_scores(config, p, t, s))

    def __repr__(self) -> str:
        return f"ModelReward({self.directory!r})"

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> np.ndarray:
        """Reward-model scores at each response's final `<end_of_turn>`."""
        _check_lengths(prompts, responses)
        ids = [
            encode_for_reward(self.tokenizer, p, r, self.preamble)
            for p, r in zip(prompts, responses, strict=True)
        ]
        scores = []
        for start in range(0, len(ids), self.batch_size):
            part = ids[start : start + self.batch_size]
            length = -(-max(len(x) for x in part) // LENGTH_BUCKET) * LENGTH_BUCKET
            # A fixed batch size: the last, short batch is padded with empty rows.
            tokens = np.full((self.batch_size, length), PAD_ID, np.int32)
            segments = np.zeros((self.batch_size, length), np.int32)
            segments[:, 0] = 1  # padding rows score their first token; their scores are dropped
            for i, row in enumerate(part):
                tokens[i, : len(row)] = row
                segments[i, : len(row)] = 1
            out = np.asarray(self._score(self.params, tokens, segments), np.float32)
            scores.append(out[: len(part)])
        return np.concatenate(scores) if scores else np.zeros(0, np.float32)


class EnsembleReward:
    """The mean of several reward functions' scores (WARM's prediction-ensemble baseline)."""

    def __init__(self, members: Sequence[RewardFunction]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = list(members)

    def __repr__(self) -> str:
        return f"EnsembleReward({self.members!r})"

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> np.ndarray:
        """Mean member reward of each pair."""
        return np.mean([m(prompts, responses) for m in self.members], axis=0).astype(np.float32)


class WeightedSum:
    """Σ_i w_i · r_i(x, y)."""

    def __init__(self, terms: Sequence[tuple[float, RewardFunction]]) -> None:
        if not terms:
            raise ValueError("a weighted sum needs at least one term")
        self.terms = list(terms)

    def __repr__(self) -> str:
        return f"WeightedSum({self.terms!r})"

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> np.ndarray:
        """Weighted sum of the terms' rewards."""
        total = np.zeros(len(responses), np.float32)
        for weight, term in self.terms:
            total += np.float32(weight) * term(prompts, responses)
        return total


class Recentred:
    """r(x, y) - offset; `fit` sets the offset to the mean reward of given (SFT) samples."""

    def __init__(self, reward: RewardFunction, offset: float = 0.0) -> None:
        self.reward = reward
        self.offset = float(offset)

    def __repr__(self) -> str:
        return f"Recentred({self.reward!r}, offset={self.offset})"

    def fit(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> Recentred:
        """Offset = the mean raw reward of these samples (the SFT policy's, usually)."""
        self.offset = float(np.mean(self.reward(prompts, responses)))
        return self

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> np.ndarray:
        """Recentred rewards."""
        return self.reward(prompts, responses) - np.float32(self.offset)


def _check_lengths(prompts: Sequence[Any], responses: Sequence[Any]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")


def reward_name(reward_fn: Any) -> str:
    """How errors name a reward: its repr, or a plain function's qualified name."""
    name = getattr(reward_fn, "__qualname__", None)
    return name if isinstance(name, str) else repr(reward_fn)


def check_rewards(rewards: Any, expected: int, reward_fn: Any) -> np.ndarray:
    """`rewards` as float32 [expected], or a ValueError naming `reward_fn` (shape, NaN, inf)."""
    try:
        values = np.asarray(rewards, np.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"reward {reward_name(reward_fn)} returned {type(rewards).__name__}, not numbers"
        ) from error
    if values.shape != (expected,):
        raise ValueError(
            f"reward {reward_name(reward_fn)} returned shape {values.shape}, expected "
            f"({expected},) (one reward per (prompt, response) pair)"
        )
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ValueError(
            f"reward {reward_name(reward_fn)} returned a non-finite reward "
            f"{values[bad[0]]} for pair {bad[0]} ({bad.size} of {expected})"
        )
    return values


def score_responses(
    reward_fn: RewardFunction, prompts: Sequence[Prompt], responses: Sequence[str]
) -> np.ndarray:
    """reward_fn(prompts, responses), checked: float32 [n], finite, errors naming the reward."""
    _check_lengths(prompts, responses)
    return check_rewards(reward_fn(prompts, responses), len(responses), reward_fn)


def decode_responses(
    tokenizer: GemmaTokenizer,
    response_ids: npt.ArrayLike,
    lengths: npt.ArrayLike,
    stop_ids: Sequence[int] = (),
) -> list[str]:
    """Text of each sampled row [n, t] cut at its length [n], without stop tokens or padding."""
    # Pad, <eos> and <end_of_turn> are always dropped; `stop_ids` adds a sampler's own stops.
    rows, lengths = np.asarray(response_ids), np.asarray(lengths)
    if rows.ndim != 2 or lengths.shape != rows.shape[:1]:
        raise ValueError(
            f"response_ids {rows.shape} and lengths {lengths.shape}: expected [n, t] and [n]"
        )
    dropped = np.asarray(sorted({*NON_TEXT_IDS, *stop_ids}))
    return [
        tokenizer.decode(row[:length][~np.isin(row[:length], dropped)].tolist())
        for row, length in zip(rows, lengths, strict=True)
    ]


def score_rollouts(
    reward_fn: RewardFunction,
    tokenizer: GemmaTokenizer,
    prompts: Sequence[Prompt],
    response_ids: npt.ArrayLike,
    lengths: npt.ArrayLike,
    stop_ids: Sequence[int] = (),
) -> np.ndarray:
    """Rewards float32 [n] of sampled rows [n, t] (lengths [n]): decoded, scored, checked."""
    responses = decode_responses(tokenizer, response_ids, lengths, stop_ids)
    return score_responses(reward_fn, prompts, responses)


_TERM_KEYS = {"rule", "model", "ensemble", "weight", "preamble", "tokenizer", "batch_size"}


def reward_from_config(spec: str | Mapping[str, Any], tokenizer: str | None) -> Recentred:
    """A reward function from a stage's `reward` value (a rule name, a reward-model directory,
    or a spec); unknown keys fail naming the key."""
    if isinstance(spec, str):
        # A directory is a reward model (what a recipe's `reward.checkpoint` input hands over).
        is_model = Path(spec).is_dir()
        spec = {"terms": [{"model": spec} if is_model else {"rule": spec}]}
    unknown = set(spec) - {"terms", "offset"}
    if unknown:
        raise KeyError(f"reward: unknown keys {sorted(unknown)}; expected terms, offset")
    if not spec.get("terms"):
        raise ValueError("reward.terms must list at least one term")
    terms = []
    for index, term in enumerate(spec["terms"]):
        where = f"reward.terms[{index}]"
        unknown = set(term) - _TERM_KEYS
        sources = [k for k in ("rule", "model", "ensemble") if term.get(k) is not None]
        if unknown:
            raise KeyError(
                f"{where}: unknown keys {sorted(unknown)}; expected {sorted(_TERM_KEYS)}"
            )
        if len(sources) != 1:
            raise ValueError(f"{where}: name exactly one of rule, model, ensemble; got {sources}")
        if sources[0] == "rule":
            terms.append((float(term.get("weight", 1.0)), RuleReward(term["rule"])))
            continue

        def model(directory: str, t: Mapping[str, Any] = term) -> ModelReward:
            # A reward model reads text with its own tokenizer: the one it carries, else the
            # term's, else the stage's (the policy's).
            carried = (Path(directory) / TOKENIZER_FILE).exists()
            tok = t.get("tokenizer") or (None if carried else tokenizer)
            if tok is None and not carried:
                raise ValueError(f"{directory} carries no tokenizer: set the reward term's")
            return ModelReward(directory, tok, t.get("preamble"), int(t.get("batch_size", 16)))

        if sources[0] == "model":
            function: RewardFunction = model(term["model"])
        else:
            function = EnsembleReward([model(d) for d in term["ensemble"]])
        terms.append((float(term.get("weight", 1.0)), function))
    reward = terms[0][1] if len(terms) == 1 and terms[0][0] == 1.0 else WeightedSum(terms)
    return Recentred(reward, float(spec.get("offset", 0.0)))
