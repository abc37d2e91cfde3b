"""The language-error rate (algorithms.md 4.3) and answer accuracy, with Wilson intervals.

A reply is a language error when its identified language is not one the prompt allows (the
prompt's own, or the one it explicitly asks for). Replies whose language cannot be determined
(too short, code only) leave the denominator and are counted. Accuracy asks whether the reply
contains the generator's answer phrase in any language, so it judges content apart from language.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

Z_95 = 1.959963984540054  # the two-sided 95% normal quantile


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion; (0, 1) when there are no trials."""
    if trials < 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    # The ends are exact at 0 and n (float rounding would leave 1e-18 there).
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


@dataclasses.dataclass(frozen=True)
class Rate:
    """A proportion with its 95% Wilson interval."""

    count: int
    total: int
    low: float
    high: float

    @property
    def value(self) -> float:
        """count / total (nan when there are no trials)."""
        return self.count / self.total if self.total else float("nan")

    @classmethod
    def of(cls, count: int, total: int) -> Rate:
        """The rate of `count` in `total` with its interval."""
        return cls(count, total, *wilson_interval(count, total))

    def as_dict(self, prefix: str) -> dict[str, float | int]:
        """Flat metrics: prefix, prefix_low, prefix_high, prefix_n."""
        return {
            prefix: self.value,
            f"{prefix}_low": self.low,
            f"{prefix}_high": self.high,
            f"{prefix}_n": self.total,
        }

    def __str__(self) -> str:
        return f"{self.value:.1%} [{self.low:.1%}, {self.high:.1%}] (n={self.total})"


def answer_correct(response: str, answers: Sequence[str]) -> bool:
    """Whether the response contains any of the answer phrases (case-insensitive)."""
    text = response.casefold()
    return any(answer.casefold() in text for answer in answers)


@dataclasses.dataclass(frozen=True)
class LanguageJudgement:
    """One reply: the language identified, whether it is an error (None: undetermined)."""

    language: str
    error: bool | None


def judge_languages(
    responses: Sequence[str],
    allowed: Sequence[Sequence[str]],
    identify: Callable[[str], str],
    undetermined: str = "und",
) -> list[LanguageJudgement]:
    """Identify each reply's language and compare it with its prompt's allowed languages."""
    if len(responses) != len(allowed):
        raise ValueError(f"{len(responses)} responses but {len(allowed)} allowed-language lists")
    judged = []
    for response, languages in zip(responses, allowed, strict=True):
        language = identify(response)
        # No allowed language (the prompt's own is undetermined): nothing to compare with.
        error = None if language == undetermined or not languages else language not in languages
        judged.append(LanguageJudgement(language, error))
    return judged


def language_error_rate(judged: Sequence[LanguageJudgement]) -> tuple[Rate, int]:
    """(the error rate over determined replies, the number of undetermined ones)."""
    determined = [j.error for j in judged if j.error is not None]
    return Rate.of(sum(determined), len(determined)), len(judged) - len(determined)
