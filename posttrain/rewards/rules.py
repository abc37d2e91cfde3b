"""Rule rewards on text: cheap, exact scores used for evaluation and as reward terms."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable

TextReward = Callable[[str, str], float]


def is_japanese_char(char: str) -> bool:
    """Hiragana, katakana, CJK ideographs and the Japanese punctuation blocks."""
    code = ord(char)
    return (
        0x3040 <= code <= 0x30FF  # hiragana, katakana
        or 0x3400 <= code <= 0x4DBF  # CJK extension A
        or 0x4E00 <= code <= 0x9FFF  # CJK unified ideographs
        or 0x3000 <= code <= 0x303F  # CJK punctuation
        or 0xFF00 <= code <= 0xFFEF  # full-width forms
    )


def japanese_fraction(text: str) -> float:
    """Share of letters (not digits, spaces or ASCII punctuation) written in Japanese scripts."""
    letters = [c for c in text if unicodedata.category(c)[0] in "LP" and not c.isascii()]
    letters += [c for c in text if c.isascii() and c.isalpha()]
    if not letters:
        return 0.0
    return sum(is_japanese_char(c) for c in letters) / len(letters)


def response_language(text: str, threshold: float = 0.5) -> str:
    """'ja' when most letters are Japanese, 'en' otherwise."""
    return "ja" if japanese_fraction(text) >= threshold else "en"


def language_match(prompt: str, response: str) -> float:
    """1.0 when the response is in the prompt's language (Japanese or English), else 0.0."""
    return float(response_language(prompt) == response_language(response))


def response_length(prompt: str, response: str) -> float:
    """Number of characters of the response."""
    return float(len(response))


RULES: dict[str, TextReward] = {
    "language_match": language_match,
    "japanese_fraction": lambda prompt, response: japanese_fraction(response),
    "response_length": response_length,
}


def get_rule(name: str) -> TextReward:
    """The named rule reward."""
    if name not in RULES:
        raise KeyError(f"unknown rule reward {name!r}; known: {sorted(RULES)}")
    return RULES[name]
