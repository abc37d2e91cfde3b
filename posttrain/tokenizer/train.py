"""Train a small sentencepiece model with Gemma's special tokens at Gemma's ids.

The real Gemma tokenizer cannot be downloaded here, so tests and tiny runs use one trained on
project-generated text: pad 0, eos 1, bos 2, unk 3, `<mask>` 4, `<2mass>` 5, `[@BOS@]` 6,
`<unused0..98>` 7..105, `<start_of_turn>` 106, `<end_of_turn>` 107, with byte fallback and
split digits like the real one.

    posttrain-train-tokenizer corpus.txt --output tok --vocab-size 2048
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from posttrain.tokenizer.gemma_tokenizer import END_OF_TURN, START_OF_TURN, GemmaTokenizer

# In id order from 4: sentencepiece places user-defined symbols right after the four controls.
USER_SYMBOLS = (
    "<mask>",
    "<2mass>",
    "[@BOS@]",
    *(f"<unused{k}>" for k in range(99)),
    START_OF_TURN,
    END_OF_TURN,
)
MIN_VOCAB = 4 + len(USER_SYMBOLS) + 256  # controls, symbols, the 256 byte-fallback pieces


def train_tokenizer(texts: Iterable[str], output_prefix: str | Path, vocab_size: int) -> Path:
    """Train on `texts` (lines or paragraphs) and return the path of `<output_prefix>.model`.

    `vocab_size` is an upper bound: a small corpus yields fewer pieces.
    """
    if vocab_size <= MIN_VOCAB:
        raise ValueError(f"vocab_size must exceed {MIN_VOCAB} (special + byte pieces)")
    output_prefix = Path(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    sentences = [line for text in texts for line in text.splitlines() if line.strip()]
    if not sentences:
        raise ValueError("no text to train the tokenizer on")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
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
        character_coverage=1.0,
        hard_vocab_limit=False,  # a small corpus may not support the full size; never fail on it
        # Determinism: one thread and every sentence used (no random sampling of the input).
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    path = output_prefix.with_suffix(".model")
    tmp = path.with_suffix(".model.tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(path)
    GemmaTokenizer(path)  # fails loudly if an id landed in the wrong place
    return path


def main(argv: list[str] | None = None) -> None:
    """Command line: train a tokenizer from text files."""
    parser = argparse.ArgumentParser(description="Train a sentencepiece model with Gemma's ids.")
    parser.add_argument("inputs", nargs="+", type=Path, help="UTF-8 text files")
    parser.add_argument("--output", type=Path, required=True, help="output prefix (adds .model)")
    parser.add_argument("--vocab-size", type=int, default=2048)
    args = parser.parse_args(argv)
    texts = [path.read_text(encoding="utf-8") for path in args.inputs]
    path = train_tokenizer(texts, args.output, args.vocab_size)
    print(f"wrote {path} ({GemmaTokenizer(path).vocab_size} pieces)")


if __name__ == "__main__":
    main()
