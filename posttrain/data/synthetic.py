"""Synthetic bilingual (English / Japanese) text with checkable answers, generated locally.

Nothing is downloaded: tokenizers for tests and tiny runs are trained on this text, and the
tiny SFT and language-fix pipelines draw their tasks from the same templates.
"""

from __future__ import annotations

import random

_OPERATIONS = {
    "plus": ("plus", "たす", lambda a, b: a + b),
    "minus": ("minus", "ひく", lambda a, b: a - b),
    "times": ("times", "かける", lambda a, b: a * b),
}

_TOPICS_EN = ["the weather", "trains", "cooking rice", "the library", "mountains", "the sea"]
_TOPICS_JA = ["天気", "電車", "ご飯の炊き方", "図書館", "山", "海"]


def arithmetic_question(rng: random.Random, language: str) -> tuple[str, str]:
    """A (question, answer) pair in `language` ('en' or 'ja') with a checkable number."""
    name = rng.choice(sorted(_OPERATIONS))
    english, japanese, op = _OPERATIONS[name]
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if language == "en":
        return f"What is {a} {english} {b}?", f"The answer is {op(a, b)}."
    if language == "ja":
        return f"{a} {japanese} {b} はいくつですか？", f"答えは {op(a, b)} です。"
    raise ValueError(f"language must be 'en' or 'ja', got {language!r}")


def small_talk(rng: random.Random, language: str) -> tuple[str, str]:
    """A (prompt, reply) pair of everyday conversation in `language`."""
    index = rng.randrange(len(_TOPICS_EN))
    if language == "en":
        topic = _TOPICS_EN[index]
        return f"Tell me something about {topic}.", f"Here is a short note about {topic}."
    if language == "ja":
        topic = _TOPICS_JA[index]
        return f"{topic}について教えてください。", f"{topic}について短く説明します。"
    raise ValueError(f"language must be 'en' or 'ja', got {language!r}")


def bilingual_corpus(num_lines: int, seed: int = 0) -> list[str]:
    """Lines of English and Japanese prompts and replies, half each, deterministic by seed."""
    rng = random.Random(seed)
    lines = []
    for i in range(num_lines):
        language = "en" if i % 2 == 0 else "ja"
        make = arithmetic_question if rng.random() < 0.6 else small_talk
        prompt, reply = make(rng, language)
        lines.append(f"{prompt}\n{reply}")
    return lines


def reversal_rows(
    num_rows: int, seed: int = 0, min_digits: int = 3, max_digits: int = 6
) -> list[dict]:
    """Prompt/response rows of a checkable task: reverse a digit string, asked in EN or JA."""
    rng = random.Random(seed)
    rows = []
    for _ in range(num_rows):
        digits = " ".join(
            str(rng.randrange(10)) for _ in range(rng.randint(min_digits, max_digits))
        )
        if rng.random() < 0.5:
            prompt = f"Reverse the digits: {digits}"
        else:
            prompt = f"数字を逆順にしてください: {digits}"
        rows.append({"prompt": prompt, "response": " ".join(reversed(digits.split()))})
    return rows
