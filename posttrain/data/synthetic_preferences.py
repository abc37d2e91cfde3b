"""Synthetic bilingual preference pairs for reward models, by pair type.

Four types, as in algorithms.md section 4.2 (the preamble reward model):

- `ordinary`: a quality preference inside one language: an on-topic, helpful reply over an
  off-topic one or a refusal.
- `language`: the same content, right language (the prompt's) over wrong language; a quarter
  of these are "hard" Japanese prompts that quote English terms.
- `override`: the prompt explicitly asks for the other language, so that reply is chosen;
  without these the reward model learns "always the prompt's language".
- `consistency`: ordinary pairs under a generic helpfulness preamble (a per-row `preamble`
  field), so the reward model learns that the preamble sets the criterion.

Every row is {prompt, chosen, rejected, pair_type[, preamble]}.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping

from posttrain.data.synthetic import arithmetic_question, small_talk

# The instruction the language-aware reward model reads before every prompt (never the policy).
LANGUAGE_PREAMBLE = (
    "You are rating an assistant reply. A good reply answers the user's request helpfully and "
    "is written in the language of the user's message, unless the user asks for another "
    "language. A reply in the wrong language is a bad reply."
)
HELPFULNESS_PREAMBLE = "You are rating an assistant reply. A good reply is helpful and on topic."

PAIR_TYPES = ("ordinary", "language", "override", "consistency")
DEFAULT_MIX = {"ordinary": 0.7, "language": 0.2, "override": 0.05, "consistency": 0.05}

_REFUSALS = {"en": "Sorry, I cannot help with that.", "ja": "すみません、お答えできません。"}
_ASK_OTHER_LANGUAGE = {"en": " Please answer in Japanese.", "ja": "英語で答えてください。"}
# Japanese prompts quoting English: code, errors, product names (algorithms.md 4.2 "hard" prompts).
_ENGLISH_TERMS = ["KeyError", "git rebase", "Docker", "README", "NullPointerException", "numpy"]


def _other(language: str) -> str:
    return "ja" if language == "en" else "en"


def _same_draw(rng: random.Random, make: Callable) -> dict[str, tuple[str, str]]:
    """The same template draw in both languages: same numbers, same topic."""
    state = rng.getstate()
    english = make(rng, "en")
    rng.setstate(state)
    return {"en": english, "ja": make(rng, "ja")}


def _hard_japanese(rng: random.Random) -> dict[str, tuple[str, str]]:
    term = rng.choice(_ENGLISH_TERMS)
    return {
        "ja": (f"{term} について教えてください。", f"{term} について短く説明します。"),
        "en": (f"Tell me about {term}.", f"Here is a short note about {term}."),
    }


def ordinary_pair(rng: random.Random, language: str) -> dict[str, str]:
    """An on-topic reply over an off-topic one or a refusal, all in `language`."""
    if rng.random() < 0.5:
        prompt, reply = arithmetic_question(rng, language)
        return {"prompt": prompt, "chosen": reply, "rejected": _REFUSALS[language]}
    prompt, reply = small_talk(rng, language)
    while True:  # a reply about another topic
        _, off_topic = small_talk(rng, language)
        if off_topic != reply:
            break
    rejected = off_topic if rng.random() < 0.7 else _REFUSALS[language]
    return {"prompt": prompt, "chosen": reply, "rejected": rejected}


def language_pair(rng: random.Random, language: str) -> dict[str, str]:
    """The reply in the prompt's language over the same reply in the other language."""
    if language == "ja" and rng.random() < 0.25:
        draws = _hard_japanese(rng)
    else:
        draws = _same_draw(rng, arithmetic_question if rng.random() < 0.5 else small_talk)
    prompt = draws[language][0]
    return {"prompt": prompt, "chosen": draws[language][1], "rejected": draws[_other(language)][1]}


def override_pair(rng: random.Random, language: str) -> dict[str, str]:
    """A prompt asking for the other language: the reply in that language is chosen."""
    draws = _same_draw(rng, arithmetic_question if rng.random() < 0.5 else small_talk)
    asked = _other(language)
    return {
        "prompt": draws[language][0] + _ASK_OTHER_LANGUAGE[language],
        "chosen": draws[asked][1],
        "rejected": draws[language][1],
    }


def preference_rows(
    num_rows: int,
    seed: int = 0,
    mix: Mapping[str, float] | None = None,
    english_fraction: float = 0.5,
    helpfulness_preamble: str = HELPFULNESS_PREAMBLE,
) -> list[dict]:
    """`num_rows` pairs drawn by type from `mix` (fractions), prompts English with
    probability `english_fraction`; deterministic by seed."""
    mix = dict(DEFAULT_MIX if mix is None else mix)
    unknown = set(mix) - set(PAIR_TYPES)
    if unknown:
        raise ValueError(f"unknown pair types {sorted(unknown)}; expected some of {PAIR_TYPES}")
    if not mix or min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise ValueError(f"mix must have non-negative fractions with a positive sum, got {mix}")
    types, weights = zip(*mix.items(), strict=True)
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        pair_type = rng.choices(types, weights)[0]
        language = "en" if rng.random() < english_fraction else "ja"
        if pair_type == "language":
            row = language_pair(rng, language)
        elif pair_type == "override":
            row = override_pair(rng, language)
        else:
            row = ordinary_pair(rng, language)
        if pair_type == "consistency":
            row["preamble"] = helpfulness_preamble
        rows.append({**row, "pair_type": pair_type})
    return rows


def preference_corpus(rows: list[dict]) -> list[str]:
    """Text lines of pairs and preambles, for training a tokenizer that covers them."""
    lines = [LANGUAGE_PREAMBLE, HELPFULNESS_PREAMBLE]
    for row in rows:
        lines += [row["prompt"], row["chosen"], row["rejected"]]
    return lines
