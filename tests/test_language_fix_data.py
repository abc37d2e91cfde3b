"""The language-fix recipe's generated data: tasks, biased SFT rows, prompts and pairs."""

from __future__ import annotations

import random

import numpy as np
import pytest

from posttrain.data import language_fix
from posttrain.data.bilingual_tasks import CHALLENGING, ORDINARY, draw_kind
from posttrain.evaluation.language_error import answer_correct
from posttrain.evaluation.language_id import allowed_languages
from posttrain.evaluation.language_id import identify as identify_any

STUDIED = ("ja", "en", "zh", "ko")  # the recipe's candidate labels (stage.languages)


def identify(text: str) -> str:
    return identify_any(text, STUDIED)


@pytest.mark.parametrize("kind", sorted(ORDINARY | CHALLENGING))
def test_every_template_reply_is_identified_as_its_language_and_contains_its_answer(kind):
    """The generator and the evaluation agree: a Japanese reply reads as ja, an English one as
    en, and each contains the answer phrase (so accuracy and language are judged apart)."""
    rng = random.Random(kind)
    for _ in range(60):
        task = draw_kind(rng, kind)
        assert task.kind == kind and task.challenging == (kind in CHALLENGING)
        for language in ("ja", "en"):
            assert identify(task.reply[language]) == language, task.reply[language]
            assert answer_correct(task.reply[language], [task.answer[language]])
        # The other language's reply is not mistaken for this prompt's answer language.
        assert identify(task.prompt["en"]) in ("en", "und")


def test_sft_rows_answer_challenging_japanese_prompts_in_english_at_the_set_rate():
    rows = language_fix.sft_rows(4000, seed=3, english_reply_rate=0.3)
    challenging = [r for r in rows if r["challenging"]]
    english = np.mean([r["reply_language"] == "en" for r in challenging])
    # 0.3 within 3σ of a binomial over ~1400 rows.
    assert abs(english - 0.3) < 3 * np.sqrt(0.3 * 0.7 / len(challenging))
    # Every other row replies in its allowed language, and the reply text really is in it.
    for row in rows:
        if not row["challenging"]:
            assert row["reply_language"] == row["allowed"][0]
        assert identify(row["response"]) == row["reply_language"]
    assert {r["segment"] for r in rows} == set(language_fix.SEGMENTS)


def test_override_prompts_ask_for_the_other_language_and_the_identifier_reads_the_request():
    rows = language_fix.prompt_rows(400, seed=1, mix={"override": 1.0})
    for row in rows:
        assert row["allowed"] != [row["language"]]
        assert allowed_languages(row["prompt"]) == set(row["allowed"])
        assert not row["challenging"]


def test_evaluation_prompts_are_challenging_japanese_with_answers():
    rows = language_fix.evaluation_prompts(200, seed=2)
    assert all(r["challenging"] and r["allowed"] == ["ja"] and r["answers"] for r in rows)
    assert {r["kind"] for r in rows} == set(CHALLENGING)
    assert all(identify(r["prompt"]) in ("ja", "und") for r in rows)


def test_preference_mixes():
    plain = language_fix.preference_rows(600, seed=0, mix=language_fix.PLAIN_PAIR_MIX)
    assert {r["pair_type"] for r in plain} == {"ordinary"}
    # English-dominant: most plain pairs have English prompts, and on Japanese prompts about
    # half prefer the correct English reply over a wrong Japanese one (content, not language).
    assert np.mean([r["language"] == "en" for r in plain]) > 0.7
    japanese = [r for r in plain if r["language"] == "ja"]
    english_chosen = np.mean([identify(r["chosen"]) == "en" for r in japanese])
    assert abs(english_chosen - 0.5) < 3 * np.sqrt(0.25 / len(japanese))
    assert all(identify(r["rejected"]) == r["language"] for r in plain)

    pairs = language_fix.preference_rows(1500, seed=0)
    types = {t: [r for r in pairs if r["pair_type"] == t] for t in language_fix.PREAMBLE_PAIR_MIX}
    for row in types["language"]:
        assert identify(row["chosen"]) != identify(row["rejected"])
        assert identify(row["chosen"]) == row["language"]  # the prompt's
    for row in types["override"]:
        assert {identify(row["chosen"])} == allowed_languages(row["prompt"])
    assert all("preamble" in r for r in types["consistency"])
    # Ordinary pairs: a fluent wrong answer in the same language, a refusal now and then.
    ordinary = types["ordinary"]
    assert all(r["chosen"] != r["rejected"] for r in ordinary)
    refusals = np.mean([r["rejected"] in language_fix._REFUSALS.values() for r in ordinary])
    assert 0.05 < refusals < 0.3


@pytest.mark.parametrize("kind", ["short", "translation"])
def test_few_reply_kinds_draw_most_wrong_replies_from_their_own_kind(kind):
    rng = random.Random(0)
    kind_replies = {r for _ in range(3000) for r in draw_kind(rng, kind).reply.values()}
    pairs = language_fix.preference_rows(6000, seed=2)
    ordinary = [r for r in pairs if r["pair_type"] == "ordinary"]
    own = [r for r in ordinary if r["kind"] == kind]
    others = [r for r in ordinary if r["kind"] not in language_fix._FEW_REPLY_KINDS]
    same = np.mean([r["rejected"] in kind_replies for r in own])
    # 85% from the same kind, and some of the 10% of any kind are that kind too.
    assert 0.82 < same < 0.95, same
    refusals = np.mean([r["rejected"] in language_fix._REFUSALS.values() for r in own])
    assert refusals < 0.1
    assert 0.1 < np.mean([r["rejected"] in language_fix._REFUSALS.values() for r in others]) < 0.2
    # An ordinary kind keeps the default 55% same-kind share.
    capital = [r for r in ordinary if r["kind"] == "capital"]
    capital_replies = {r for _ in range(3000) for r in draw_kind(rng, "capital").reply.values()}
    assert 0.5 < np.mean([r["rejected"] in capital_replies for r in capital]) < 0.8


def test_bad_settings_name_the_culprit():
    with pytest.raises(ValueError, match="english_reply_rate"):
        language_fix.sft_rows(10, english_reply_rate=1.5)
    with pytest.raises(ValueError, match="unknown segments"):
        language_fix.prompt_rows(10, mix={"klingon": 1.0})
    with pytest.raises(ValueError, match="unknown task kind"):
        draw_kind(random.Random(0), "poetry")


def test_rl_prompt_mix_sets_the_segment_shares(tmp_path):
    from posttrain.stages.synthetic import SyntheticConfig

    mix = {"japanese_challenging": 0.8, "override": 0.2}
    rows = language_fix.prompt_rows(2000, seed=1, mix=mix)
    share = np.mean([r["segment"] == "japanese_challenging" for r in rows])
    assert abs(share - 0.8) < 3 * np.sqrt(0.16 / 2000)
    assert {r["segment"] for r in rows} == set(mix)
    default = language_fix.prompt_rows(2000, seed=1)
    assert {r["segment"] for r in default} == set(language_fix.RL_MIX)
    assert SyntheticConfig(task="language_fix", rl_prompt_mix=mix).rl_prompt_mix == mix
