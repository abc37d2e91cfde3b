"""Sentencepiece tokenizer with Gemma's special ids and chat format, and a trainer for tiny ones."""

from posttrain.tokenizer.gemma_tokenizer import (
    BOS_ID,
    END_OF_TURN_ID,
    EOS_ID,
    MASK_ID,
    PAD_ID,
    START_OF_TURN_ID,
    UNK_ID,
    GemmaTokenizer,
    check_special_pieces,
)
from posttrain.tokenizer.train import train_tokenizer

__all__ = [
    "BOS_ID",
    "END_OF_TURN_ID",
    "EOS_ID",
    "MASK_ID",
    "PAD_ID",
    "START_OF_TURN_ID",
    "UNK_ID",
    "GemmaTokenizer",
    "check_special_pieces",
    "train_tokenizer",
]
