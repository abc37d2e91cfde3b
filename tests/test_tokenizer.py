"""The Gemma tokenizer wrapper and the tiny-tokenizer trainer."""

import pytest

from posttrain.data.synthetic import bilingual_corpus
from posttrain.tokenizer import END_OF_TURN_ID, START_OF_TURN_ID, GemmaTokenizer, train_tokenizer
from posttrain.tokenizer import train as train_module

HF_EXAMPLE = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi!"},
    {"role": "user", "content": "2+2?"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = train_tokenizer(
        bilingual_corpus(1500, seed=1), tmp_path_factory.mktemp("tok") / "t", 800
    )
    return GemmaTokenizer(path)


def test_special_ids_are_gemmas(tokenizer):
    piece = tokenizer.processor.id_to_piece
    expected = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>", 7: "<unused0>"}
    expected |= {105: "<unused98>", 106: "<start_of_turn>", 107: "<end_of_turn>"}
    assert {i: piece(i) for i in expected} == expected


def test_unseen_characters_round_trip_through_bytes(tokenizer):
    text = "Emoji 😀, rare kanji 麤 and tabs\tand  double spaces\n\nnewlines"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.processor.unk_id() not in ids


def test_digits_are_split(tokenizer):
    pieces = [tokenizer.processor.id_to_piece(i) for i in tokenizer.encode("12345")]
    assert pieces == ["1", "2", "3", "4", "5"]


def test_render_chat_matches_the_hf_template(tokenizer):
    expected = (
        "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\nHi!<end_of_turn>\n"
        "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert tokenizer.render_chat(HF_EXAMPLE, add_generation_prompt=True) == expected


def test_encode_chat_ids(tokenizer):
    ids = tokenizer.encode_chat(HF_EXAMPLE, add_generation_prompt=True)
    assert ids[:2] == [2, START_OF_TURN_ID]
    assert ids.count(START_OF_TURN_ID) == 4 and ids.count(END_OF_TURN_ID) == 3
    rendered = tokenizer.render_chat(HF_EXAMPLE, add_generation_prompt=True)
    assert tokenizer.decode(ids) == rendered.removeprefix("<bos>")
    # Same ids as tokenizing the rendered text in one go (what transformers does).
    assert ids == [2, *tokenizer.encode(rendered.removeprefix("<bos>"))]


def test_role_mask_covers_model_answers_and_end_of_turn(tokenizer):
    messages = [*HF_EXAMPLE, {"role": "assistant", "content": "答えは 4 です。"}]
    ids, mask = tokenizer.encode_chat_with_roles(messages)
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    answers = [*tokenizer.encode("Hi!"), END_OF_TURN_ID, *tokenizer.encode("答えは 4 です。")]
    assert trained == [*answers, END_OF_TURN_ID]
    # The mask is contiguous per answer and never covers the newline after <end_of_turn>.
    for i, m in enumerate(mask):
        if m and ids[i] == END_OF_TURN_ID:
            assert not mask[i + 1]


def test_system_role_is_rejected_unless_merged(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="no system role"):
        tokenizer.render_chat(messages)
    merged = tokenizer.render_chat(messages, merge_system=True)
    assert merged == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"


def test_wrong_piece_at_special_id_is_rejected(tmp_path, monkeypatch):
    # Drop <end_of_turn>: <start_of_turn> moves to 105 and id 106 holds a byte piece.
    monkeypatch.setattr(
        train_module, "USER_SYMBOLS", (*train_module.USER_SYMBOLS[:-3], "<start_of_turn>")
    )
    with pytest.raises(ValueError, match="id 106"):
        train_tokenizer(bilingual_corpus(300), tmp_path / "bad", 600)


def test_training_is_deterministic(tmp_path):
    corpus = bilingual_corpus(500, seed=3)
    first = train_tokenizer(corpus, tmp_path / "a", 600).read_bytes()
    second = train_tokenizer(corpus, tmp_path / "b", 600).read_bytes()
    assert first == second


def test_command_line(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(bilingual_corpus(400)), encoding="utf-8")
    train_module.main([str(corpus), "--output", str(tmp_path / "cli"), "--vocab-size", "600"])
    assert (tmp_path / "cli.model").exists()
    assert "cli.model" in capsys.readouterr().out
