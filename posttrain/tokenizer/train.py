"""Train a small sentencepiece model with Gemma's special tokens at Gemma's ids.

The real Gemma tokenizer cannot be downloaded here, so tests and tiny runs use one trained on
local text: pad 0, eos 1, bos 2, unk 3, `<mask>` 4, `<2mass>` 5, `[@BOS@]` 6, `<unused0..98>`
7..105, `<start_of_turn>` 106, `<end_of_turn>` 107, then the 256 byte-fallback pieces (108..363;
the real model keeps its bytes elsewhere, so never hard-code byte ids), then learned pieces.
Like the real one it falls back to bytes, splits digits, keeps whitespace and adds no prefix.

    posttrain-train-tokenizer corpus.txt --output tok --vocab-size 2048
"""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm

from posttrain.tokenizer.gemma_tokenizer import END_OF_TURN, START_OF_TURN, check_special_pieces

# In id order from 4: sentencepiece places user-defined symbols right after the four controls
# (ids 0-3 are set explicitly), then the byte pieces, then what it learns.
USER_SYMBOLS = (
    "<mask>",
    "<2mass>",
    "[@BOS@]",
    *(f"<unused{k}>" for k in range(99)),
    START_OF_TURN,
    END_OF_TURN,
)
MIN_VOCAB = 4 + len(USER_SYMBOLS) + 256  # controls, symbols, the 256 byte-fallback pieces

TextSource = str | os.PathLike[str]


def train_tokenizer(
    texts_or_files: TextSource | Iterable[TextSource],
    output_prefix: str | Path,
    vocab_size: int,
) -> Path:
    """Train a BPE model and return the path of `<output_prefix>.model`.

    `texts_or_files` is one file path, or an iterable whose `Path` items are UTF-8 files and
    whose `str` items are text. Every non-blank line is one training sentence, so a file and a
    list of its lines give the same model. `vocab_size` is an upper bound: a small corpus yields
    fewer pieces.
    """
    if vocab_size <= MIN_VOCAB:
        raise ValueError(f"vocab_size must exceed {MIN_VOCAB} (special + byte pieces)")
    sentences = [line for text in _texts(texts_or_files) for line in text.splitlines()]
    sentences = [line for line in sentences if line.strip()]
    if not sentences:
        raise ValueError("no text to train the tokenizer on")
    model = io.BytesIO()
    # Determinism: one thread, every sentence used in the given order (no sampling or shuffling)
    # and a fixed seed for whatever sentencepiece still draws at random. The model is written
    # to memory, so no path ends up inside it: same input, byte-identical model.
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=list(USER_SYMBOLS),
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    data = model.getvalue()
    check_special_pieces(spm.SentencePieceProcessor(model_proto=data), "trained tokenizer")
    path = Path(f"{output_prefix}.model")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)  # a reader never sees half a model
    return path


def _texts(source: TextSource | Iterable[TextSource]) -> Iterator[str]:
    """The text of each item: a path is read as UTF-8, a str is taken as text."""
    if isinstance(source, str | os.PathLike):
        source = [Path(source)]
    for item in source:
        if isinstance(item, os.PathLike):
            yield Path(item).read_text(encoding="utf-8")
        elif isinstance(item, str):
            yield item
        else:
            raise TypeError(f"expected text or a path, got {type(item).__name__}")


def main(argv: list[str] | None = None) -> None:
    """Command line: train a tokenizer from text files."""
    parser = argparse.ArgumentParser(description="Train a sentencepiece model with Gemma's ids.")
    parser.add_argument(
        "inputs", nargs="+", type=Path, help="UTF-8 text files, one sentence a line"
    )
    parser.add_argument("--output", type=Path, required=True, help="output prefix (adds .model)")
    parser.add_argument("--vocab-size", type=int, default=2048, help="upper bound on pieces")
    args = parser.parse_args(argv)
    path = train_tokenizer(args.inputs, args.output, args.vocab_size)
    size = spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    print(f"wrote {path} ({size} pieces)")


if __name__ == "__main__":
    main()
