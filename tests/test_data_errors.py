"""Data errors name the file and the 1-based line (or the 0-based row); local paths never reach
the hub; column mappings rename Alpaca / Stack Exchange schemas before validation."""

import json
import time

import pyarrow
import pyarrow.parquet
import pytest

from posttrain.data.preferences import (
    STACK_EXCHANGE_COLUMNS,
    build_preferences,
    load_preferences,
)
from posttrain.data.prompts import DataError, load_prompts, load_rows
from posttrain.data.sft import DataConfig, build_examples, load_examples
from posttrain.data.sources import read_rows
from posttrain.data.synthetic import bilingual_corpus
from posttrain.tokenizer import GemmaTokenizer, train_tokenizer

GOOD = {"prompt": "hello", "response": "world"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return GemmaTokenizer(
        train_tokenizer(bilingual_corpus(200), tmp_path_factory.mktemp("t") / "t", 500)
    )


def write_lines(path, lines):
    path.write_bytes(
        b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines)
    )
    return str(path)


def test_bad_jsonl_lines_are_named_by_1_based_line_or_skipped_and_counted(tmp_path):
    source = write_lines(
        tmp_path / "train.jsonl",
        [
            json.dumps(GOOD),
            "",  # blank lines are not rows
            '{"prompt": "a", "response": }',
            "[1, 2]",
            b'{"prompt": "\xff"}',
            json.dumps(GOOD),
        ],
    )
    with pytest.raises(DataError, match=r"train\.jsonl line 3: not valid JSON \(Expecting value"):
        read_rows(source)
    rows, skipped = read_rows(source, skip_malformed=True)
    assert (len(rows), skipped) == (2, 3)
    assert rows.locations == [f"{source} line 1", f"{source} line 6"]
    with pytest.raises(DataError, match=r"b\.jsonl line 2: not a JSON object \(got list"):
        read_rows(write_lines(tmp_path / "b.jsonl", [json.dumps(GOOD), "[1, 2]"]))
    with pytest.raises(DataError, match=r"b\.jsonl line 1: not UTF-8"):
        read_rows(write_lines(tmp_path / "b.jsonl", [b'{"prompt": "\xff"}']))


def test_json_list_items_are_named_by_the_line_they_start_on(tmp_path):
    items = [GOOD, {"prompt": "only a prompt"}, "not an object"]
    listed = tmp_path / "pairs.json"
    listed.write_text(json.dumps(items, indent=2))  # items start on lines 2, 6 and 9
    with pytest.raises(DataError, match=r"pairs\.json line 9: not a JSON object \(got str"):
        read_rows(str(listed))
    rows, skipped = read_rows(str(listed), skip_malformed=True)
    assert rows == items[:2] and skipped == 1
    assert rows.locations == [f"{listed} line 2", f"{listed} line 6"]
    listed.write_text('[\n {"prompt": "a"},\n {"prompt": }\n]')
    with pytest.raises(DataError, match=r"line 3: not valid JSON .* cannot be skipped"):
        read_rows(str(listed), skip_malformed=True)
    as_lines = write_lines(tmp_path / "lines.json", [json.dumps(GOOD), "{oops"])
    with pytest.raises(DataError, match=r"lines\.json line 2: .*one object per line"):
        read_rows(as_lines)


def test_row_errors_say_which_line_or_which_0_based_row(tmp_path, tokenizer):
    lines = [json.dumps(GOOD)] * 6 + [json.dumps({"prompt": "hi", "response": " "})]
    source = write_lines(tmp_path / "train.jsonl", lines)
    config = DataConfig(train=source)
    with pytest.raises(DataError, match=r"train\.jsonl line 7: empty response$"):
        load_examples(source, tokenizer, config)
    with pytest.raises(DataError, match=r"^mem row 6 \(0-based\): empty response$"):
        build_examples([json.loads(line) for line in lines], tokenizer, config, "mem")
    table = pyarrow.Table.from_pylist([GOOD, {"prompt": "hi", "response": None}])
    pyarrow.parquet.write_table(table, tmp_path / "train.parquet")
    parquet = str(tmp_path / "train.parquet")
    with pytest.raises(DataError, match=r"train\.parquet row 1 \(0-based\): missing field"):
        load_examples(parquet, tokenizer, DataConfig(train=parquet))
    pairs = write_lines(tmp_path / "pairs.jsonl", ["", json.dumps({"prompt": "a", "chosen": "b"})])
    with pytest.raises(DataError, match=r"pairs\.jsonl line 2: 'rejected' must be"):
        load_preferences(pairs, tokenizer, 64)
    with pytest.raises(DataError, match=r"prompts\.jsonl line 1: no usable 'prompt'"):
        load_prompts(write_lines(tmp_path / "prompts.jsonl", ['{"prompt": ""}']))


def test_skipped_lines_are_counted_in_the_stats(tmp_path, tokenizer):
    source = write_lines(
        tmp_path / "train.jsonl", [json.dumps(GOOD), "{bad", json.dumps({"prompt": "x"})]
    )
    _, stats = load_examples(source, tokenizer, DataConfig(train=source, skip_malformed=True))
    assert (stats.rows, stats.examples, stats.malformed_skipped) == (3, 1, 2)
    pair = {"prompt": "a", "chosen": "b", "rejected": "c"}
    pairs = write_lines(tmp_path / "pairs.jsonl", [json.dumps(pair), "]"])
    _, stats = load_preferences(pairs, tokenizer, 64, skip_malformed=True)
    assert (stats.rows, stats.pairs, stats.malformed_skipped) == (2, 1, 1)


@pytest.fixture
def no_hub(monkeypatch):
    """Replace the hub loader; the calls it got are returned."""
    import datasets

    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return [GOOD, {"prompt": "q"}]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


# (source, message) with data/train (no extension), data/train.jsonl and data/eval.jsonl present.
LOCAL_PATH_ERRORS = [
    ("data/train", r"data/train: unsupported file without an extension; supported: \.jsonl"),
    ("data/eval", r"data/eval: no such file .*; did you mean data/eval\.jsonl\?"),
    ("data/test", r"data/test: no such file or directory \(local data is \.jsonl, \.json"),
    ("./train", "no such file"),
    ("~/surely/not/here/train", "no such file"),
    ("owner/name/extra", "no such file"),
    ("train.csv", r"train\.csv: unsupported format '\.csv'; supported: \.jsonl, \.json"),
    ("data", r"data: holds files of several splits \(eval\.jsonl, train\.jsonl\)"),
]


@pytest.mark.parametrize(
    ("source", "message"), LOCAL_PATH_ERRORS, ids=[source for source, _ in LOCAL_PATH_ERRORS]
)
def test_local_paths_fail_at_once_naming_the_formats(
    tmp_path, monkeypatch, no_hub, source, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train").write_text(json.dumps(GOOD))
    (tmp_path / "data" / "eval.jsonl").write_text(json.dumps(GOOD))
    (tmp_path / "data" / "train.jsonl").write_text(json.dumps(GOOD))
    started = time.perf_counter()
    with pytest.raises(DataError, match=message):
        read_rows(source)
    assert time.perf_counter() - started < 1.0 and no_hub == []


def test_directories_and_hub_names(tmp_path, monkeypatch, tokenizer, no_hub):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_lines(shards / "train-0.jsonl", [json.dumps(GOOD)])
    write_lines(shards / "train-1.jsonl", [json.dumps(GOOD), "{bad"])
    with pytest.raises(DataError, match=r"shards/train-1\.jsonl line 2: not valid JSON"):
        read_rows(str(shards))
    assert len(read_rows(str(shards), skip_malformed=True)[0]) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: a directory with no \.jsonl, \.json, \.parquet"):
        read_rows(str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)  # `owner/` does not exist here, so the name goes to the hub
    rows = load_rows("owner/name", "validation")
    load_rows("teknium/OpenHermes-2.5")  # `.5` is a version, not a file extension
    assert no_hub == [("owner/name", "validation"), ("teknium/OpenHermes-2.5", "train")]
    assert rows[0] == GOOD
    with pytest.raises(DataError, match=r"^owner/name \(split train\) row 1 \(0-based\): missing"):
        load_examples("owner/name", tokenizer, DataConfig(train="owner/name"))


def test_alpaca_columns_are_mapped_before_validation(tmp_path, tokenizer):
    alpaca = {"instruction": "Reverse 123.", "input": "", "output": "321"}
    with_input = {"instruction": "Translate.", "input": "こんにちは", "output": "Hello"}
    source = write_lines(
        tmp_path / "alpaca.jsonl",
        [json.dumps(row) for row in (alpaca, with_input, {"instruction": "no answer"})],
    )
    columns = {"instruction": "prompt", "output": "response"}
    with pytest.raises(
        DataError, match=r"alpaca\.jsonl line 3: column\(s\) 'output' \(mapped to 'response'\)"
    ):
        read_rows(source, columns=columns)
    rows, skipped = read_rows(source, skip_malformed=True, columns=columns)
    assert skipped == 1
    assert rows == [
        {"prompt": "Reverse 123.", "input": "", "response": "321"},  # an empty input is not added
        {"prompt": "Translate.\n\nこんにちは", "response": "Hello"},
    ]
    config = DataConfig(train=source, columns=columns, skip_malformed=True)
    examples, stats = load_examples(source, tokenizer, config)
    assert len(examples) == 2 and stats.malformed_skipped == 1
    with pytest.raises(
        DataError, match=r"data\.columns: several columns are mapped to \['prompt'\]"
    ):
        DataConfig(train=source, columns={"instruction": "prompt", "question": "prompt"})


def test_stack_exchange_pairs_are_mapped_to_prompt_chosen_rejected(tmp_path, tokenizer):
    theirs = {"question": "hi?", "response_j": "hello", "response_k": "no", "score": 3}
    ours = {"prompt": "hi?", "chosen": "hello", "rejected": "no"}
    mapped, _ = build_preferences([theirs], tokenizer, 64, "mem", columns=STACK_EXCHANGE_COLUMNS)
    reference, _ = build_preferences([ours], tokenizer, 64, "mem")
    assert (mapped.chosen == reference.chosen).all() and (
        mapped.rejected == reference.rejected
    ).all()
    assert (mapped.chosen != mapped.rejected).any()
    source = write_lines(tmp_path / "se.jsonl", [json.dumps({**theirs, "response_k": None})])
    with pytest.raises(DataError, match=r"se\.jsonl line 1: column\(s\) 'response_k' \(mapped to"):
        load_preferences(source, tokenizer, 64, columns=STACK_EXCHANGE_COLUMNS)
