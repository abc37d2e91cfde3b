"""Bilingual (Japanese / English) tasks with checkable answers, for the language-fix recipe.

Every draw is one task in both languages from the same fill-ins (same country, same number, same
error), so a reply's content and its language can be judged apart: `answers` holds, for each
language, the phrase a correct reply contains. Kinds are either ordinary or "challenging", the
Japanese prompts that pull an English-centric model to English (algorithms.md 4.2): product and
tool names, English error messages, code, very short prompts, and translation of terms.
Everything comes from the vocabularies below; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

LANGUAGES = ("ja", "en")


@dataclasses.dataclass(frozen=True)
class Task:
    """One task in both languages: prompts, replies and the answer phrase of each."""

    kind: str
    challenging: bool
    prompt: dict[str, str]
    reply: dict[str, str]
    answer: dict[str, str]


# (country ja, country en, capital ja, capital en)
_CAPITALS = [
    ("日本", "Japan", "東京", "Tokyo"),
    ("フランス", "France", "パリ", "Paris"),
    ("イタリア", "Italy", "ローマ", "Rome"),
    ("ドイツ", "Germany", "ベルリン", "Berlin"),
    ("イギリス", "the UK", "ロンドン", "London"),
    ("中国", "China", "北京", "Beijing"),
    ("韓国", "Korea", "ソウル", "Seoul"),
    ("カナダ", "Canada", "オタワ", "Ottawa"),
    ("スペイン", "Spain", "マドリード", "Madrid"),
    ("エジプト", "Egypt", "カイロ", "Cairo"),
    ("ロシア", "Russia", "モスクワ", "Moscow"),
    ("タイ", "Thailand", "バンコク", "Bangkok"),
]
# (category ja, category en, three items ja, three items en)
_LISTS = [
    ("果物", "fruits", ("りんご", "みかん", "ぶどう"), ("apples", "oranges", "grapes")),
    ("色", "colors", ("赤", "青", "緑"), ("red", "blue", "green")),
    ("動物", "animals", ("犬", "猫", "馬"), ("dogs", "cats", "horses")),
    ("季節", "seasons", ("春", "夏", "秋"), ("spring", "summer", "autumn")),
    ("飲み物", "drinks", ("お茶", "水", "牛乳"), ("tea", "water", "milk")),
    ("乗り物", "vehicles", ("電車", "バス", "車"), ("trains", "buses", "cars")),
]
# (term, what it is in Japanese, in English): names that stay English inside Japanese text.
_TERMS = [
    ("Docker", "コンテナを動かすソフトウェア", "software that runs containers"),
    ("Python", "プログラミング言語", "a programming language"),
    ("GitHub", "コードを共有するサービス", "a service for sharing code"),
    ("Excel", "表計算のソフト", "a spreadsheet program"),
    ("Wi-Fi", "無線でつなぐ仕組み", "a way to connect without wires"),
    ("USB", "機器をつなぐ規格", "a standard for connecting devices"),
    ("iPhone", "アップルのスマートフォン", "a smartphone made by Apple"),
    ("Linux", "オープンソースのOS", "an open source operating system"),
    ("Slack", "チャットのサービス", "a chat service"),
    ("Zoom", "ビデオ会議のサービス", "a video meeting service"),
    ("Chrome", "グーグルのブラウザ", "a web browser made by Google"),
    ("JSON", "データを書く形式", "a format for writing data"),
]
# (error, meaning in Japanese, in English); {v} is the name in the message.
_ERRORS = [
    ("KeyError", "キー {v} が辞書にありません", "the key {v} is not in the dictionary"),
    ("NameError", "変数 {v} が定義されていません", "the variable {v} is not defined"),
    ("FileNotFoundError", "ファイル {v} が見つかりません", "the file {v} was not found"),
    ("AttributeError", "属性 {v} がありません", "there is no attribute {v}"),
    ("ImportError", "モジュール {v} を読み込めません", "the module {v} cannot be imported"),
]
_NAMES = ["name", "age", "user", "data", "count", "items", "price", "config"]
_WORDS = ["hello", "apple", "tokyo", "data", "gemma", "blue", "seven", "world"]
# (Japanese word, English word): "how do you say X in English?"
_TRANSLATIONS = [
    ("猫", "cat"),
    ("犬", "dog"),
    ("水", "water"),
    ("山", "mountain"),
    ("本", "book"),
    ("花", "flower"),
    ("空", "sky"),
    ("魚", "fish"),
    ("鳥", "bird"),
    ("月", "moon"),
    ("海", "sea"),
    ("雨", "rain"),
]
# (short prompt ja, reply ja, short prompt en, reply en); the answer is the reply's first words.
_SHORT = [
    ("ありがとう", "どういたしまして。", "Thank you", "You are welcome."),
    ("こんにちは", "こんにちは、何でも聞いてください。", "Hello", "Hello, ask me anything."),
    (
        "おはよう",
        "おはようございます、今日もよい一日を。",
        "Good morning",
        "Good morning, have a nice day.",
    ),
    ("おやすみ", "おやすみなさい、よい夢を。", "Good night", "Good night, sweet dreams."),
    ("すごいね", "ありがとうございます、うれしいです。", "Wow", "Thank you, I am glad."),
    ("元気？", "はい、元気です。あなたは？", "How are you", "I am fine. And you?"),
    ("よろしく", "こちらこそ、よろしくお願いします。", "Nice to meet you", "Nice to meet you too."),
    ("ごめんね", "大丈夫です、気にしないでください。", "Sorry", "It is fine, do not worry."),
    ("またね", "はい、またお話ししましょう。", "See you", "See you, talk to you soon."),
    ("助けて", "はい、どうしましたか？", "Help me", "Sure, what is wrong?"),
    (
        "暑いね",
        "本当に暑いですね、水を飲みましょう。",
        "It is hot",
        "It is really hot, drink some water.",
    ),
    ("眠い", "少し休んでください。", "I am sleepy", "Please take a short rest."),
]


def capital(rng: random.Random) -> Task:
    """The capital of a country (a fact)."""
    country_ja, country_en, city_ja, city_en = rng.choice(_CAPITALS)
    return Task(
        "capital",
        False,
        {"ja": f"{country_ja}の首都はどこですか？", "en": f"What is the capital of {country_en}?"},
        {
            "ja": f"{country_ja}の首都は{city_ja}です。",
            "en": f"The capital of {country_en} is {city_en}.",
        },
        {"ja": city_ja, "en": city_en},
    )


def addition(rng: random.Random) -> Task:
    """The sum of two one-digit numbers."""
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return Task(
        "addition",
        False,
        {"ja": f"{a} たす {b} はいくつですか？", "en": f"What is {a} plus {b}?"},
        {"ja": f"答えは {a + b} です。", "en": f"The answer is {a + b}."},
        {"ja": str(a + b), "en": str(a + b)},
    )


def conversion(rng: random.Random) -> Task:
    """Kilometres to metres."""
    n = rng.randint(2, 20)
    return Task(
        "conversion",
        False,
        {
            "ja": f"{n} キロメートルは何メートルですか？",
            "en": f"How many meters are {n} kilometers?",
        },
        {"ja": f"{n * 1000} メートルです。", "en": f"It is {n * 1000} meters."},
        {"ja": str(n * 1000), "en": str(n * 1000)},
    )


def three_items(rng: random.Random) -> Task:
    """Three members of a category."""
    category_ja, category_en, items_ja, items_en = rng.choice(_LISTS)
    return Task(
        "list",
        False,
        {"ja": f"{category_ja}を三つ挙げてください。", "en": f"Name three {category_en}."},
        {
            "ja": "、".join(items_ja) + "です。",
            "en": f"{items_en[0]}, {items_en[1]} and {items_en[2]}.",
        },
        {"ja": items_ja[0], "en": items_en[0]},
    )


def product_name(rng: random.Random) -> Task:
    """What a tool or product is; its name stays English in the Japanese prompt."""
    term, meaning_ja, meaning_en = rng.choice(_TERMS)
    return Task(
        "product",
        True,
        {"ja": f"{term} とは何ですか？", "en": f"What is {term}?"},
        {"ja": f"{term} は{meaning_ja}です。", "en": f"{term} is {meaning_en}."},
        {"ja": meaning_ja, "en": meaning_en},
    )


def error_message(rng: random.Random) -> Task:
    """What an English error message means."""
    error, meaning_ja, meaning_en = rng.choice(_ERRORS)
    name = rng.choice(_NAMES)
    # The answer is what the error means, not the copied name: "が辞書にありません".
    answer = {
        language: max(meaning.split("{v}"), key=len).strip()
        for language, meaning in (("ja", meaning_ja), ("en", meaning_en))
    }
    meaning_ja, meaning_en = meaning_ja.format(v=name), meaning_en.format(v=name)
    return Task(
        "error",
        True,
        {
            "ja": f"{error}: {name} というエラーが出ました。どういう意味ですか？",
            "en": f"I got the error {error}: {name}. What does it mean?",
        },
        {"ja": f"{meaning_ja}という意味です。", "en": f"It means {meaning_en}."},
        answer,
    )


def code_output(rng: random.Random) -> Task:
    """What a line of code prints."""
    word = rng.choice(_WORDS)
    code = f'`print("{word}")`'
    return Task(
        "code",
        True,
        {"ja": f"{code} を実行すると何が表示されますか？", "en": f"What does {code} print?"},
        {"ja": f"{word} と表示されます。", "en": f"It prints {word} on the screen."},
        {"ja": word, "en": word},
    )


def short_prompt(rng: random.Random) -> Task:
    """A greeting or thanks of a few characters."""
    prompt_ja, reply_ja, prompt_en, reply_en = rng.choice(_SHORT)
    return Task(
        "short",
        True,
        {"ja": prompt_ja, "en": prompt_en},
        {"ja": reply_ja, "en": reply_en},
        {"ja": reply_ja[:4], "en": reply_en.split(",")[0].split(".")[0]},
    )


def term_translation(rng: random.Random) -> Task:
    """The English word for a Japanese one (a translation-adjacent prompt)."""
    word_ja, word_en = rng.choice(_TRANSLATIONS)
    return Task(
        "translation",
        True,
        {
            "ja": f"「{word_ja}」は英語で何と言いますか？",
            "en": f"What is the English word for {word_en}?",
        },
        {"ja": f"英語では {word_en} と言います。", "en": f"The English word is {word_en}."},
        {"ja": word_en, "en": word_en},
    )


ORDINARY: dict[str, Callable[[random.Random], Task]] = {
    "capital": capital,
    "addition": addition,
    "conversion": conversion,
    "list": three_items,
}
CHALLENGING: dict[str, Callable[[random.Random], Task]] = {
    "product": product_name,
    "error": error_message,
    "code": code_output,
    "short": short_prompt,
    "translation": term_translation,
}
# Appended to a prompt to ask for the other language explicitly (algorithms.md 4.2 overrides).
ASK_FOR = {
    "en": ("英語で答えてください。", " Please answer in English."),
    "ja": ("日本語で答えてください。", " Please answer in Japanese."),
}


def draw_kind(rng: random.Random, kind: str) -> Task:
    """A task of the named kind."""
    kinds = ORDINARY | CHALLENGING
    if kind not in kinds:
        raise ValueError(f"unknown task kind {kind!r}; expected one of {sorted(kinds)}")
    return kinds[kind](rng)


def draw_task(rng: random.Random, challenging: bool | None = None) -> Task:
    """A task of a random kind: challenging, ordinary, or either (None) with equal weight."""
    if challenging is None:
        challenging = rng.random() < 0.5
    kinds = CHALLENGING if challenging else ORDINARY
    return kinds[rng.choice(sorted(kinds))](rng)


def with_request(task: Task, language: str, asked: str) -> str:
    """The task's prompt in `language` that explicitly asks for a reply in `asked`."""
    in_japanese, in_english = ASK_FOR[asked]
    if language == "ja":
        return f"{task.prompt['ja']}{in_japanese}"
    return f"{task.prompt['en']}{in_english}"
