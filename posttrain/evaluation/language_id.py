"""Language identification for the language-error rate (algorithms.md 4.3).

`identify(text)` decides in this order, cheap exact rules before the statistical model:
1. `clean` keeps the natural-language part: fenced code blocks, inline code, LaTeX/math, URLs,
   e-mail addresses and emoji go, and so do bare code lines (an all-ASCII line with a code
   token, such as `f(x)`, `a_b`, `x.y`, `=` or a trailing `;`, and at least as many code tokens
   and keywords as words), because a model often pastes code without fences and code is in no
   natural language.
2. Fewer than `MIN_LETTERS` letters left -> "und" (undetermined, left out of the LER
   denominator). Letters, not characters: "OK!!!", "1 + 1 = 2" and a code-only reply carry no
   language, so this one rule also makes every code-only string "und".
3. kana / (kana + han + latin) >= `KANA_RATIO` -> "ja": kana is the decisive Japanese-vs-Chinese
   signal, and an English error message or identifier inside Japanese text cannot outvote it.
4. Otherwise py3langid's naive Bayes model (shipped inside the wheel; it never opens a socket)
   picks among `LANGUAGES`, with two guards: an English sentence with a few names in kanji
   (no kana, no Chinese function characters, at least as many Latin letters as han) is
   classified without its han, whose multi-byte n-grams would otherwise outvote the English
   (py3langid labels "I met 田中太郎 in 東京 yesterday." as Cantonese); and text with no
   n-gram features is "und". A kanji-only string is ambiguous between ja and zh: it gets the
   statistical label, mostly "zh" ("東京都庁舎" -> zh).

`LANGUAGES` drops py3langid's dialect labels (yue, wuu, arz, ary: they fold into zh and ar) and the
Latin-script languages with little web text (Nigerian Pidgin, Luganda, Latin, ...), which short
technical English otherwise lands on ("Run pip install numpy first." -> pcm). Output labels are
the ISO 639-1 codes py3langid uses, or "und".

`allowed_languages(prompt)` is the language of the last user turn, unless the prompt explicitly
asks for reply languages (`requested_languages`: the last user turn, else a system turn); the
request then replaces it. `is_language_error` is None when either side is undetermined.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from py3langid.langid import MODEL_FILE, RAW_FLOOR, LanguageIdentifier

UNDETERMINED = "und"
MIN_LETTERS = 5
KANA_RATIO = 0.05
LANGUAGES = (
    # Scripts of their own (or nearly): no short-English confusion, kept whole.
    *("am", "ar", "as", "ba", "be", "bg", "bn", "dz", "el", "fa", "gu", "he", "hi", "hy", "ja"),
    *("ka", "kk", "km", "kn", "ko", "ky", "lo", "mk", "ml", "mn", "mr", "my", "ne", "or", "pa"),
    *("ps", "ru", "si", "sr", "ta", "te", "tg", "th", "tt", "ug", "uk", "ur", "zh"),
    # Latin-script languages with a large written web.
    *("af", "az", "bs", "ca", "cs", "cy", "da", "de", "en", "es", "et", "eu", "fi", "fr", "ga"),
    *("gl", "hr", "hu", "id", "is", "it", "lt", "lv", "ms", "mt", "nl", "no", "pl", "pt", "ro"),
    *("sk", "sl", "sq", "sv", "sw", "tl", "tr", "uz", "vi"),
)

Prompt = str | Sequence[Mapping[str, str]]  # one user message, or the chat turns before the reply

# clean(): the order matters. Fences before inline code (a fence is made of backticks), code
# before math and URLs (code holds `$` and `://`), and URLs before e-mail addresses (a URL may
# hold `user@host`). An unclosed fence runs to the end: a reply cut at max length.
_FENCED_CODE = re.compile(r"(`{3,}|~{3,}).*?(?:\1|\Z)", re.DOTALL)
_INLINE_CODE = re.compile(r"``[^\n]+?``|`[^`\n]+`")
# Bounded spans: an unclosed opener in a degenerate, repeating sample must not cost O(n^2).
_MATH = re.compile(
    r"\$\$.{1,4000}?\$\$|\\\[.{1,4000}?\\\]|\\\(.{1,1000}?\\\)"
    r"|\\begin\{([A-Za-z]+\*?)\}.{0,4000}?\\end\{\1\}"
    # $...$ as pandoc reads it, so that prices ("$5 and $10") stay text: no space inside
    # either dollar, and no digit right after the closing one.
    r"|(?<![\\$])\$(?![\s$])(?:[^$\n\\]|\\.){1,1000}?(?<![\s\\])\$(?![\d$])",
    re.DOTALL,
)
# ASCII URL characters only, so Japanese text glued to a URL ("…/docsを見て") survives.
_URL = re.compile(r"(?:\b(?:https?|ftp|file)://|\bwww\.)[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
_EMOJI = re.compile(
    "[\U0001f000-\U0001faff\u2600-\u27bf\u2b00-\u2bff\u2300-\u23ff"
    "\ufe0e\ufe0f\u200d\u20e3\U000e0020-\U000e007f\u3030\u303d\u3297\u3299]"
)
# Bare code lines: tokens with code punctuation, operators standing alone, and keywords.
_CODE_TOKEN = re.compile(r"[{}\[\]=<>_]|\w\(|[A-Za-z]{2}\.[A-Za-z]")  # not "(aside)", "e.g."
# Not "-" or "*": they open markdown list items.
_OPERATORS = frozenset(
    ["+", "/", "%", "**", "//", "==", "!=", "<=", ">=", "=>", "->", "+=", "-=", "&&", "||"]
)
_KEYWORDS = frozenset(
    {
        *("def", "return", "import", "from", "as", "for", "in", "print", "if", "else", "elif"),
        *("while", "class", "lambda", "self", "None", "True", "False", "null", "true", "false"),
        *("const", "let", "var", "function", "async", "await", "yield", "echo"),
    }
)
# A word token, with the punctuation prose wraps words in: `'name'`, `(JST).`, `Tanaka-san,`.
_WORD = re.compile(r"[\"'(\[]*[A-Za-z]+(?:[-'.][A-Za-z]+)*[\"')\].,!?:;]*")
# Grammatical characters of Chinese that Japanese names and place names do not use.
_CHINESE_FUNCTION_CHARS = frozenset(
    "的是了这這们們个個吗嗎呢吧说說没沒很把被让讓给給还還都就也我你他她它在"
)


class ScriptCounts(NamedTuple):
    """Letters of each script in a text (algorithms.md 4.3, step 1)."""

    kana: int  # hiragana U+3040–309F, katakana U+30A0–30FF, halfwidth katakana U+FF66–FF9D
    han: int  # CJK ideographs U+4E00–9FFF and extension A U+3400–4DBF
    hangul: int  # syllables U+AC00–D7AF and jamo U+1100–11FF, U+3130–318F
    latin: int  # Basic Latin, Latin-1, Latin Extended A/B and Additional, fullwidth Latin
    letters: int  # all letters (str.isalpha), the four above and every other script

    @property
    def kana_ratio(self) -> float:
        """kana / (kana + han + latin), 0.0 when the text has none of the three."""
        total = self.kana + self.han + self.latin
        return self.kana / total if total else 0.0


def clean(text: str) -> str:
    """The natural-language part of text: code, math, URLs, e-mail addresses and emoji removed."""
    for pattern in (_FENCED_CODE, _INLINE_CODE, _MATH, _URL, _EMAIL, _EMOJI):
        text = pattern.sub(" ", text)
    kept = [line for line in text.splitlines() if not _is_code_line(line)]
    return " ".join(" ".join(kept).split())


def _is_code_line(line: str) -> bool:
    # Only all-ASCII lines: a line with Japanese in it is prose with an identifier inside. Code
    # needs one code token; then keywords side with it, so "for i in range(10): print(i)" is
    # code and "You can use the len() function here." is prose.
    if not line.isascii():
        return False
    code = int(line.rstrip().endswith((";", "{", "}")))  # not a prose "; ": "I came; I saw"
    keywords = words = 0
    for token in line.split():
        if _CODE_TOKEN.search(token) or token in _OPERATORS:
            code += 1
        elif token.rstrip(":;,") in _KEYWORDS:
            keywords += 1
        elif _WORD.fullmatch(token):
            words += 1
    return code > 0 and code + keywords >= words


def _is_han(code: int) -> bool:
    return 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF


def script_counts(text: str) -> ScriptCounts:
    """Kana, han, hangul, Latin and all letters of text (pass it cleaned)."""
    kana = han = hangul = latin = letters = 0
    for char in text:
        if not char.isalpha():  # also skips the katakana middle dot and the 〜 of "〜です"
            continue
        letters += 1
        code = ord(char)
        if code < 0x250 or 0x1E00 <= code <= 0x1EFF or 0xFF21 <= code <= 0xFF5A:
            latin += 1
        elif 0x3040 <= code <= 0x30FF or 0xFF66 <= code <= 0xFF9D:
            kana += 1
        elif _is_han(code):
            han += 1
        elif 0xAC00 <= code <= 0xD7AF or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F:
            hangul += 1
    return ScriptCounts(kana, han, hangul, latin, letters)


@functools.cache
def _identifier(languages: tuple[str, ...] = LANGUAGES) -> LanguageIdentifier:
    # Loaded on first use and once per process (per label set): loading is the slow part. Our
    # own instance: set_languages on py3langid's module-level one would change it for others.
    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=False)
    unknown = sorted(set(languages) - set(identifier.nb_classes))
    if unknown:
        raise ValueError(f"languages {unknown} are not among py3langid's labels")
    identifier.set_languages(languages)
    return identifier


def _statistical(text: str, counts: ScriptCounts, languages: tuple[str, ...]) -> str:
    # Kanji names in English prose: their multi-byte n-grams would outvote the English words.
    if counts.han and counts.latin >= counts.han and _CHINESE_FUNCTION_CHARS.isdisjoint(text):
        text = "".join(c for c in text if not _is_han(ord(c)))
    label, score = _identifier(languages).classify(text)
    return UNDETERMINED if score <= RAW_FLOOR else label  # RAW_FLOOR: no n-gram matched


def identify(text: str, languages: Sequence[str] | None = None) -> str:
    """The language of text as an ISO 639-1 code ("ja", "en", "zh", "ko", ...) or "und";
    `languages` limits the statistical model's choice (a study of known languages: short
    English replies otherwise land on Tagalog or Finnish now and then)."""
    text = clean(text)
    counts = script_counts(text)
    if counts.letters < MIN_LETTERS:
        return UNDETERMINED
    if counts.kana_ratio >= KANA_RATIO:
        return "ja"
    return _statistical(text, counts, LANGUAGES if languages is None else tuple(sorted(languages)))


# Names of the languages a prompt may ask for, in the prompt languages we expect.
_LANGUAGE_NAMES = {
    "en": ("English", "英語", "えいご", "英文", "영어"),
    "ja": ("Japanese", "日本語", "にほんご", "日文", "일본어"),
    "zh": ("Chinese", "Mandarin", "中国語", "中國語", "中文", "汉语", "漢語", "중국어"),
    "ko": ("Korean", "韓国語", "韓國語", "한국어", "韩语", "韓語"),
}
# Japanese: "英語で答えて", "英語のみで回答してください", "英語でお願いします", "回答は英語で",
# "英語に翻訳して". A verb must follow "で", so "英語では…" and "英語で何と言いますか" (what is
# the English word, answered in Japanese) are no request.
_JA_VERB = (
    "答|こた|回答|返答|返信|返事|応答|説明|書|かい|教|記述|出力|話|しゃべ|喋|お願い|おねがい"
    "|頼|たの|よろしく|翻訳|訳|まとめ|要約|記載|表記|作成|返し|返せ|レス|対応|会話|やりとり"
)
_EN_VERB = (
    "answer|reply|respond|write|speak|talk|explain|response|output|translate|rewrite"
    "|summari[sz]e|communicate|continue"
)
# "Summarize this article written in English" describes the article, it asks for no language.
_EN_NOT_DESCRIPTION = "".join(
    rf"(?<!\b{word} )" for word in ("written", "spoken", "published", "said", "used")
)
_JA_MOD = r"(?:[、,]?\s*(?:簡潔に|詳しく|詳細に|丁寧に|短く|全て|すべて|全部|改めて|もう一度))?"
_JA_OTHERS = r"(?:(?:と|や|、|および|及び|か)(?:{any}))*(?:の両方|両方)?"  # 英語と日本語で
_EN_OTHERS = r"(?:\s*(?:,|and|or|&)\s*(?:{any}))*"  # in English and Japanese
_REQUEST_TEMPLATES = (
    rf"{{name}}{_JA_OTHERS}(?:のみ|だけ)?で(?:のみ|だけ)?(?:の)?{_JA_MOD}(?:{_JA_VERB})",
    rf"(?:{{any}})(?:と|や|、|および|及び|か){{name}}{_JA_OTHERS}(?:のみ|だけ)?で(?:の)?{_JA_MOD}"
    rf"(?:{_JA_VERB})",
    r"(?:答え|回答|返答|返事|返信|説明)は{name}(?:のみ|だけ)?で",
    r"{name}に(?:翻訳|訳|直|変換|書き換え)",
    # Chinese: "用英文回答", "请用中文写", "翻译成日语".
    r"[用以]{name}(?:来)?(?:回答|回复|答|写|說|说|解释|解釋|翻译|翻譯)",
    r"(?:翻译|翻譯|译|譯)成{name}",
    # Korean: "영어로 답해 주세요".
    r"{name}로\s*(?:답|대답|작성|설명|번역|말해|써)",
    # English: a verb of replying, then "in/into (plain) English" in the same sentence.
    rf"\b(?:{_EN_VERB})\b[^.?!\n。？！]{{{{0,40}}}}?{_EN_NOT_DESCRIPTION}"
    r"\b(?:in|into)\s+(?:both\s+)?"
    rf"(?:plain\s+|simple\s+|proper\s+|only\s+)?(?:(?:{{any}}){_EN_OTHERS}\s*(?:,|and|or|&)\s*)?"
    r"{name}\b",
    r"\bin\s+{name}(?:\s+only)?,?\s+please\b|\bplease\s+(?:use|speak)\s+{name}\b",
)
_ANY_NAME = "|".join(re.escape(n) for names in _LANGUAGE_NAMES.values() for n in names)
_REQUEST_PATTERNS = tuple(
    (
        language,
        re.compile(
            "|".join(
                t.format(name=f"(?:{'|'.join(map(re.escape, names))})", any=_ANY_NAME)
                for t in _REQUEST_TEMPLATES
            ),
            re.IGNORECASE,
        ),
    )
    for language, names in _LANGUAGE_NAMES.items()
)
# A negated request ("英語で答えないで", "don't answer in English") asks for no language, and
# neither does a description: "英語で書かれた記事" (an article written in English), "英語で答えた".
_NEGATION_AFTER = re.compile(
    r"\A[^。\n]{0,3}?(?:ないで|ずに|るな|なく|不要|禁止)"
    r"|\A[^。\n]{0,2}?(?:かれ|され|た|てある|ている|ていた)"
)
_NEGATION_BEFORE = re.compile(
    r"(?:\bnot|n't|\bnever|\bno)\s+(?:\w+\s+){0,2}\Z|不要\Z|别\Z|不\Z", re.IGNORECASE
)


def requested_languages(text: str) -> set[str]:
    """The reply languages text explicitly asks for (empty when it asks for none)."""
    requested = set()
    for language, pattern in _REQUEST_PATTERNS:
        for match in pattern.finditer(text):
            after = text[match.end() : match.end() + 8]
            before = text[max(0, match.start() - 20) : match.start()]
            if not (_NEGATION_AFTER.search(after) or _NEGATION_BEFORE.search(before)):
                requested.add(language)
                break
    return requested


def _turns(prompt: Prompt, role: str) -> list[str]:
    return [turn["content"] for turn in prompt if turn.get("role") == role]


@functools.lru_cache(maxsize=4096)
def _allowed_for_text(user_text: str, system_text: str) -> frozenset[str]:
    # Cached: the LER samples k replies per prompt and judges the prompt once per reply.
    requested = requested_languages(user_text) or requested_languages(system_text)
    if requested:
        return frozenset(requested)
    language = identify(user_text)
    return frozenset() if language == UNDETERMINED else frozenset({language})


def allowed_languages(prompt: Prompt) -> set[str]:
    """The reply languages that are no error: the explicitly requested ones, else the prompt's."""
    if isinstance(prompt, str):
        return set(_allowed_for_text(prompt, ""))
    users = _turns(prompt, "user")
    if not users:
        raise ValueError("a chat prompt needs a user turn")
    return set(_allowed_for_text(users[-1], "\n".join(_turns(prompt, "system"))))


def is_language_error(prompt: Prompt, response: str) -> bool | None:
    """Whether the response's language is not allowed; None when either is undetermined."""
    allowed = allowed_languages(prompt)
    language = identify(response)
    if not allowed or language == UNDETERMINED:
        return None
    return language not in allowed
