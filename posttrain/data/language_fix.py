"""The language-fix recipe's data: biased SFT rows, RL and evaluation prompts, preference pairs.

Built from `bilingual_tasks`. The SFT rows are biased the way an English-centric post-training
mix is: a challenging Japanese prompt gets the English reply with probability
`english_reply_rate` (Gemma 2 2B answered such prompts in English 29.6% of the time), every
other prompt the reply in its own (or its explicitly requested) language. Preference pairs come
in two mixes: `plain`, what a reward model trained on English-dominant preferences sees:
ordinary quality pairs over mostly English prompts, never a language contrast, and on half of
the Japanese prompts the preferred reply is the correct English one over a wrong Japanese one
(raters judged the content, not the language), and `preamble`, the
algorithms.md 4.2 mix for the prompt-instructed reward model (language-contrast pairs weighted
to challenging prompts, explicit overrides, and ordinary pairs under a generic preamble).

Every prompt row carries `language` (the prompt's), `allowed` (the reply languages that are not
an error) and `answers` (a phrase per language that a correct reply contains), so evaluation
reads the truth from the generator instead of guessing it from the prompt.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from posttrain.data.bilingual_tasks import LANGUAGES, Task, draw_kind, draw_task, with_request
from posttrain.data.synthetic_preferences import HELPFULNESS_PREAMBLE, LANGUAGE_PREAMBLE

# Which prompts a row set holds, by segment (fractions).
SEGMENTS = ("english", "japanese", "japanese_challenging", "override")
SFT_MIX = {"english": 0.35, "japanese": 0.2, "japanese_challenging": 0.35, "override": 0.1}
RL_MIX = {"english": 0.15, "japanese": 0.15, "japanese_challenging": 0.6, "override": 0.1}
PLAIN_PAIR_MIX = {"ordinary": 1.0}
PREAMBLE_PAIR_MIX = {"ordinary": 0.45, "language": 0.35, "override": 0.15, "consistency": 0.05}
_REFUSALS = {"en": "Sorry, I cannot help with that.", "ja": "すみません、お答えできません。"}


def _other(language: str) -> str:
    return "en" if language == "ja" else "ja"


def _check_mix(mix: Mapping[str, float], known: tuple[str, ...], what: str) -> None:
    unknown = set(mix) - set(known)
    if unknown:
        raise ValueError(f"unknown {what} {sorted(unknown)}; expected some of {known}")
    if not mix or min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise ValueError(f"{what} fractions must be non-negative with a positive sum: {mix}")


def draw_prompt(rng: random.Random, segment: str) -> tuple[Task, dict]:
    """A task and its prompt row (prompt, language, allowed, answers, kind, flags) of a segment."""
    if segment == "english":
        task, language, asked = draw_task(rng), "en", None
    elif segment == "japanese":
        task, language, asked = draw_task(rng, challenging=False), "ja", None
    elif segment == "japanese_challenging":
        task, language, asked = draw_task(rng, challenging=True), "ja", None
    elif segment == "override":
        language = rng.choice(LANGUAGES)
        task, asked = draw_task(rng), _other(language)
    else:
        raise ValueError(f"unknown segment {segment!r}; expected one of {SEGMENTS}")
    prompt = task.prompt[language] if asked is None else with_request(task, language, asked)
    row = {
        "prompt": prompt,
        "language": language,
        "allowed": [asked or language],
        "answers": sorted(set(task.answer.values())),
        "kind": task.kind,
        "challenging": task.challenging and language == "ja" and asked is None,
        "segment": segment,
    }
    return task, row


def _segments(rng: random.Random, num_rows: int, mix: Mapping[str, float]) -> list[str]:
    _check_mix(mix, SEGMENTS, "segments")
    names, weights = zip(*mix.items(), strict=True)
    return [rng.choices(names, weights)[0] for _ in range(num_rows)]


def sft_rows(
    num_rows: int,
    seed: int = 0,
    english_reply_rate: float = 0.3,
    mix: Mapping[str, float] | None = None,
) -> list[dict]:
    """Prompt/response rows; challenging Japanese prompts get the English reply with
    probability `english_reply_rate`, all others the allowed language's reply."""
    if not 0.0 <= english_reply_rate <= 1.0:
        raise ValueError(f"english_reply_rate must be in [0, 1], got {english_reply_rate}")
    rng = random.Random(seed)
    rows = []
    for segment in _segments(rng, num_rows, SFT_MIX if mix is None else mix):
        task, row = draw_prompt(rng, segment)
        reply_language = row["allowed"][0]
        if row["challenging"] and rng.random() < english_reply_rate:
            reply_language = "en"
        rows.append(
            row | {"response": task.reply[reply_language], "reply_language": reply_language}
        )
    return rows


def prompt_rows(num_rows: int, seed: int = 0, mix: Mapping[str, float] | None = None) -> list[dict]:
    """Prompt rows (no responses) of the segment mix, for RL."""
    rng = random.Random(seed)
    return [
        draw_prompt(rng, s)[1] for s in _segments(rng, num_rows, RL_MIX if mix is None else mix)
    ]


def evaluation_prompts(num_rows: int, seed: int = 0) -> list[dict]:
    """Challenging Japanese prompts: the set the language-error rate is measured on."""
    return prompt_rows(num_rows, seed, mix={"japanese_challenging": 1.0})


# (refusal, same kind) cumulative shares of a wrong-content negative; the rest is any kind.
_NEGATIVE_SHARES = (0.15, 0.7)
# A short prompt's reply is one of 12 fixed ones and a translation's one of 24, so the reward
# model must bind every (prompt, wrong reply of the same kind) combination; at the default shares
# most were never seen rejected and RL found them ("またね" -> "はい、元気です。あなたは？";
# seed 8: "「海」は英語で何と言いますか？" -> "英語では dog と言います。", "dog" rejected once in
# 20 pairs and scored a near-tie with "sea").
_FEW_REPLY_KINDS = ("short", "translation")
_FEW_REPLY_NEGATIVE_SHARES = (0.05, 0.9)


def _wrong_content(rng: random.Random, task: Task, language: str) -> str:
    """A fluent reply in `language` that answers something else: mostly the same kind of task
    with other fill-ins (so the reward model learns the content, not just the reply's shape),
    else a task of any kind (15% / 55% / 30%: refusal, same kind, any kind; 5% / 85% / 10% for a
    short or translation prompt, whose replies come from a small fixed set). Any kind includes
    the ordinary ones for a challenging prompt: RL otherwise finds a fluent off-topic reply the
    reward model never saw rejected ("Chrome とは何ですか？" -> "タイの首都はバンコクです。")."""
    few_replies = task.kind in _FEW_REPLY_KINDS
    refusal, same_kind = _FEW_REPLY_NEGATIVE_SHARES if few_replies else _NEGATIVE_SHARES
    roll = rng.random()
    if roll < refusal:
        return _REFUSALS[language]
    for _ in range(100):
        other = draw_kind(rng, task.kind) if roll < same_kind else draw_task(rng)
        if other.answer[language] != task.answer[language]:
            return other.reply[language]
    raise RuntimeError(f"no different {task.kind} task drawn in 100 tries")


def preference_rows(
    num_rows: int,
    seed: int = 0,
    mix: Mapping[str, float] | None = None,
    english_fraction: float | None = None,
    english_chosen: float | None = None,
) -> list[dict]:
    """Pairs {prompt, chosen, rejected, pair_type, kind, language[, preamble]} of the `mix`
    (default: the preamble mix); prompts English with probability `english_fraction` where a
    pair type lets the language vary (default 0.8 for the plain mix, 0.3 otherwise); an
    ordinary pair on a Japanese prompt prefers the correct English reply with probability
    `english_chosen` (default 0.5 for the plain mix, 0 otherwise)."""
    mix = dict(PREAMBLE_PAIR_MIX if mix is None else mix)
    _check_mix(mix, ("ordinary", "language", "override", "consistency"), "pair types")
    plain = set(mix) == {"ordinary"}
    if english_fraction is None:
        english_fraction = 0.8 if plain else 0.3
    if english_chosen is None:
        english_chosen = 0.5 if plain else 0.0
    rng = random.Random(seed)
    types, weights = zip(*mix.items(), strict=True)
    rows = []
    for _ in range(num_rows):
        pair_type = rng.choices(types, weights)[0]
        english = rng.random() < english_fraction
        if pair_type == "override":
            task, row = draw_prompt(rng, "override")
            asked = row["allowed"][0]
            chosen, rejected = task.reply[asked], task.reply[row["language"]]
        elif pair_type == "language":
            # Contrast pairs lean on the prompts that pull a model to English.
            segment = "english" if english else "japanese_challenging"
            if not english and rng.random() < 0.3:
                segment = "japanese"
            task, row = draw_prompt(rng, segment)
            chosen, rejected = task.reply[row["language"]], task.reply[_other(row["language"])]
        else:
            segment = "english" if english else rng.choice(["japanese", "japanese_challenging"])
            task, row = draw_prompt(rng, segment)
            chosen = task.reply[row["language"]]
            rejected = _wrong_content(rng, task, row["language"])
            if row["language"] == "ja" and rng.random() < english_chosen:
                chosen = task.reply["en"]  # right content, wrong language: preferred anyway
        pair = {"prompt": row["prompt"], "chosen": chosen, "rejected": rejected}
        if pair_type == "consistency":
            pair["preamble"] = HELPFULNESS_PREAMBLE
        rows.append(
            pair | {"pair_type": pair_type, "kind": row["kind"], "language": row["language"]}
        )
    return rows


def corpus(sft: list[dict], pairs: list[dict]) -> list[str]:
    """Text lines covering every prompt, reply and preamble, for training the tokenizer."""
    lines = [LANGUAGE_PREAMBLE, HELPFULNESS_PREAMBLE, *_REFUSALS.values()]
    lines += [f"{row['prompt']}\n{row['response']}" for row in sft]
    for pair in pairs:
        lines += [pair["prompt"], pair["chosen"], pair["rejected"]]
    return lines
