"""The Gemma tokenizer wrapper and the tiny-tokenizer trainer, on a tokenizer trained here."""

import random
import re

import pytest
import sentencepiece as spm

from posttrain.tokenizer import (
    BOS_ID,
    END_OF_TURN_ID,
    EOS_ID,
    PAD_ID,
    START_OF_TURN_ID,
    GemmaTokenizer,
    train_tokenizer,
)
from posttrain.tokenizer import train as train_module

HF_EXAMPLE = [
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi!"},
    {"role": "user", "content": "2+2?"},
]
HF_RENDERED = (
    "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\nHi!<end_of_turn>\n"
    "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n"
)


def make_corpus(num_lines: int, seed: int) -> list[str]:
    """English and Japanese sentences with numbers in them; no emoji, no rare kanji."""
    rng = random.Random(seed)
    nouns = ["cat", "train", "river", "book", "garden", "teacher", "city", "apple", "letter"]
    verbs = ["sees", "finds", "carries", "reads", "paints", "visits", "counts"]
    ja_nouns = ["猫", "電車", "川", "本", "庭", "先生", "町", "りんご", "手紙"]
    ja_verbs = ["見ます", "探します", "読みます", "描きます", "訪ねます", "数えます"]
    lines = []
    for _ in range(num_lines):
        n = rng.randrange(1, 10_000)
        if rng.random() < 0.5:
            a, b = rng.sample(nouns, 2)
            lines.append(f"The {a} {rng.choice(verbs)} {n} {b}s on day {rng.randrange(31)}.")
        else:
            a, b = rng.sample(ja_nouns, 2)
            lines.append(f"{a}は{n}個の{b}を{rng.choice(ja_verbs)}。{rng.randrange(12)}時です。")
    return lines


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return make_corpus(400, seed=0)


@pytest.fixture(scope="session")
def tokenizer(corpus, tmp_path_factory) -> GemmaTokenizer:
    return GemmaTokenizer(train_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "t", 1000))


def pieces(tokenizer: GemmaTokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.processor.id_to_piece(i) for i in ids]


def test_special_ids_are_gemmas(tokenizer):
    expected = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>", 5: "<2mass>"}
    expected |= {6: "[@BOS@]", 7: "<unused0>", 105: "<unused98>"}
    expected |= {106: "<start_of_turn>", 107: "<end_of_turn>"}
    assert {i: tokenizer.processor.id_to_piece(i) for i in expected} == expected
    assert (PAD_ID, EOS_ID, BOS_ID, START_OF_TURN_ID, END_OF_TURN_ID) == (0, 1, 2, 106, 107)
    assert 500 < tokenizer.vocab_size <= 1000


def test_unseen_characters_round_trip_through_bytes(tokenizer):
    text = "Emoji 😀🫠, rare kanji 麤龘 and ünïcödé"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.processor.unk_id() not in ids
    assert "<0xF0>" in pieces(tokenizer, ids)  # the emoji's first byte


def test_digits_are_split(tokenizer):
    text = "On day 2024 we counted 1234567 猫 and 89."
    surfaces = [p.surface for p in tokenizer.processor.encode(text, return_type="proto").pieces]
    assert [s for s in surfaces if any(c.isdigit() for c in s)] == list("2024123456789")


def test_newlines_and_repeated_spaces_round_trip(tokenizer):
    text = "  two leading spaces\n\nblank line,   three spaces\tand a tab \n trailing  "
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_decode_skips_pad_and_does_not_stop_at_eos(tokenizer):
    ids = [PAD_ID, BOS_ID, *tokenizer.encode("cat"), EOS_ID, *tokenizer.encode("dog"), PAD_ID]
    assert tokenizer.decode(ids) == "catdog"


def test_render_chat_matches_the_hf_template(tokenizer):
    assert tokenizer.render_chat(HF_EXAMPLE, add_generation_prompt=True) == HF_RENDERED
    padded = [{**m, "content": f"  {m['content']}\n"} for m in HF_EXAMPLE]  # trimmed like HF
    assert tokenizer.render_chat(padded, add_generation_prompt=True) == HF_RENDERED
    model_role = [{**m, "role": "model"} if m["role"] == "assistant" else m for m in HF_EXAMPLE]
    assert tokenizer.render_chat(model_role, add_generation_prompt=True) == HF_RENDERED


def test_encode_chat_ids(tokenizer):
    ids = tokenizer.encode_chat(HF_EXAMPLE, add_generation_prompt=True)
    assert ids[:2] == [BOS_ID, START_OF_TURN_ID]
    assert tokenizer.decode(ids) == HF_RENDERED.removeprefix("<bos>")
    # Each turn marker is one id where the rendered text has it: cutting the ids at 106 and
    # 107 gives the rendered text cut at "<start_of_turn>" and "<end_of_turn>".
    assert ids.count(START_OF_TURN_ID) == 4 and ids.count(END_OF_TURN_ID) == 3
    cuts = [i for i, t in enumerate(ids) if t in (START_OF_TURN_ID, END_OF_TURN_ID)]
    ends = [*cuts[1:], len(ids)]
    segments = [tokenizer.decode(ids[a + 1 : b]) for a, b in zip(cuts, ends, strict=True)]
    expected = ["user\nHello", "\n", "model\nHi!", "\n", "user\n2+2?", "\n", "model\n"]
    assert segments == re.split("<start_of_turn>|<end_of_turn>", HF_RENDERED)[1:] == expected
    # The same ids as tokenizing the rendered text after an explicit BOS (what transformers does);
    # the text "<bos>" itself is not a control token and never becomes id 2.
    assert ids == [BOS_ID, *tokenizer.encode(HF_RENDERED.removeprefix("<bos>"))]
    assert BOS_ID not in tokenizer.encode("<bos>")


def test_role_mask_covers_model_answers_and_end_of_turn(tokenizer):
    # given a chat whose answers include digits, spaces and byte-fallback characters
    turns = [("user", "Hello"), ("model", "Hi!"), ("user", "2+2?"), ("model", "答えは 4 です 😀麤")]
    messages = [{"role": role, "content": content} for role, content in turns]
    # when it is encoded with roles
    ids, mask = tokenizer.encode_chat_with_roles(messages)
    # then exactly the answer tokens and their <end_of_turn> are masked, one run per answer
    expected_ids, expected_mask = [BOS_ID], [False]
    for role, content in turns:
        header = [START_OF_TURN_ID, *tokenizer.encode(f"{role}\n")]
        body = [*tokenizer.encode(content), END_OF_TURN_ID]
        newline = tokenizer.encode("\n")
        expected_ids += header + body + newline
        expected_mask += [False] * len(header) + [role == "model"] * len(body) + [False]
    assert ids == expected_ids
    assert mask == expected_mask


def test_system_role_is_rejected_unless_merged(tokenizer):
    messages = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="no system role"):
        tokenizer.render_chat(messages)
    with pytest.raises(ValueError, match="no system role"):
        tokenizer.encode_chat(messages)
    merged = tokenizer.render_chat(messages, merge_system=True)
    assert merged == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"


def test_malformed_chats_are_rejected(tokenizer):
    user, model = {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}
    with pytest.raises(ValueError, match="alternate"):
        tokenizer.render_chat([user, user])
    with pytest.raises(ValueError, match="alternate"):
        tokenizer.render_chat([model, user])
    with pytest.raises(ValueError, match="last turn to be a user turn"):
        tokenizer.render_chat([user, model], add_generation_prompt=True)
    with pytest.raises(ValueError, match="role 'tool'"):
        tokenizer.render_chat([{"role": "tool", "content": "x"}])


def test_wrong_piece_at_special_id_is_rejected(corpus, tmp_path):
    # given a model whose turn markers are swapped: <end_of_turn> sits at 106
    symbols = [*train_module.USER_SYMBOLS[:-2], "<end_of_turn>", "<start_of_turn>"]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_prefix=str(tmp_path / "swapped"),
        vocab_size=600,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=symbols,
        byte_fallback=True,
        num_threads=1,
        minloglevel=2,
    )
    # then loading names the id and the piece found there
    with pytest.raises(ValueError, match=r"id 106 should be '<start_of_turn>'.*'<end_of_turn>'"):
        GemmaTokenizer(tmp_path / "swapped.model")


def test_training_is_deterministic(corpus, tmp_path):
    first = train_tokenizer(corpus, tmp_path / "a", 1000).read_bytes()
    second = train_tokenizer(corpus, tmp_path / "b", 1000).read_bytes()
    assert first == second


def test_command_line(corpus, tmp_path, capsys):
    text_file = tmp_path / "corpus.txt"
    text_file.write_text("\n".join(corpus) + "\n", encoding="utf-8")
    train_module.main([str(text_file), "--output", str(tmp_path / "cli"), "--vocab-size", "1000"])
    assert "cli.model" in capsys.readouterr().out
    # A file and the list of its lines train the same model.
    from_lines = train_tokenizer(corpus, tmp_path / "lines", 1000)
    assert (tmp_path / "cli.model").read_bytes() == from_lines.read_bytes()
    GemmaTokenizer(tmp_path / "cli.model")


def test_too_small_a_vocabulary_is_rejected(corpus, tmp_path):
    with pytest.raises(ValueError, match="vocab_size must exceed"):
        train_tokenizer(corpus, tmp_path / "small", 300)
