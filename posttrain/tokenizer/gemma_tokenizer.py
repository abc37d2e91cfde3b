"""A sentencepiece tokenizer with Gemma's special ids and chat format.

Format (Gemma 1 and 2, and the HF Gemma IT chat template):
`<bos><start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n{answer}<end_of_turn>\n`.
There is no system role. `<bos>` is a control token, so it is emitted as an id, never parsed
from text; the turn markers are user-defined pieces, one id each, parsed wherever they appear.
Gemma 3 moves the turn markers (105/106) and is rejected by the id check below.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import sentencepiece as spm

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3
MASK_ID = 4
FIRST_UNUSED_ID = 7  # <unusedK> is id 7 + K
START_OF_TURN_ID = 106
END_OF_TURN_ID = 107

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"

# The ids every Gemma 1/2 tokenizer agrees on, with the piece expected there.
SPECIAL_PIECES: dict[int, str] = {
    PAD_ID: "<pad>",
    EOS_ID: "<eos>",
    BOS_ID: "<bos>",
    UNK_ID: "<unk>",
    START_OF_TURN_ID: START_OF_TURN,
    END_OF_TURN_ID: END_OF_TURN,
}

_ROLES = {"user": "user", "assistant": "model", "model": "model"}

Message = Mapping[str, str]


def check_special_pieces(processor: spm.SentencePieceProcessor, source: str) -> None:
    """Raise ValueError naming the first Gemma special id that holds the wrong piece."""
    size = processor.get_piece_size()
    for token_id, piece in SPECIAL_PIECES.items():
        found = processor.id_to_piece(token_id) if token_id < size else None
        if found != piece:
            raise ValueError(
                f"{source}: id {token_id} should be {piece!r} (Gemma special id) but is {found!r}"
            )
    # encode_chat relies on the turn markers being parsed out of text; a control piece at the
    # right id would pass the check above yet encode as a dozen byte pieces.
    for token_id in (START_OF_TURN_ID, END_OF_TURN_ID):
        ids = processor.encode(SPECIAL_PIECES[token_id], out_type=int)
        if ids != [token_id]:
            raise ValueError(
                f"{source}: {SPECIAL_PIECES[token_id]!r} (id {token_id}) encodes as {ids}, "
                "not as its own id; it must be a user-defined piece"
            )


class GemmaTokenizer:
    """Sentencepiece model + Gemma chat template; the real `tokenizer.model` loads the same way."""

    def __init__(self, model_file: str | Path) -> None:
        self.model_file = Path(model_file)
        if not self.model_file.exists():
            raise FileNotFoundError(f"tokenizer model {self.model_file} not found")
        self.processor = spm.SentencePieceProcessor(model_file=str(self.model_file))
        check_special_pieces(self.processor, str(self.model_file))

    @property
    def vocab_size(self) -> int:
        """Number of pieces (the model's logit dimension must be at least this)."""
        return self.processor.get_piece_size()

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of plain text; turn markers in the text become their single ids."""
        ids = self.processor.encode(text, out_type=int)
        return [BOS_ID, *ids] if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of all the ids (no stop at `<eos>`); pad, bos and eos add nothing."""
        return self.processor.decode([int(i) for i in ids if int(i) != PAD_ID])

    def render_chat(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = False,
        merge_system: bool = False,
    ) -> str:
        """The Gemma chat string, starting with `<bos>`, as the HF chat template renders it."""
        turns = _turns(messages, add_generation_prompt, merge_system)
        text = "<bos>" + "".join(f"{START_OF_TURN}{r}\n{c}{END_OF_TURN}\n" for r, c in turns)
        return text + (f"{START_OF_TURN}model\n" if add_generation_prompt else "")

    def encode_chat(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = False,
        merge_system: bool = False,
    ) -> list[int]:
        """Token ids of the chat, starting with BOS_ID."""
        return self.encode_chat_with_roles(messages, add_generation_prompt, merge_system)[0]

    def encode_chat_with_roles(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = False,
        merge_system: bool = False,
    ) -> tuple[list[int], list[bool]]:
        """Token ids and a mask that is True on every model answer and its `<end_of_turn>`.

        The conversation is tokenized in one go (as transformers does with the real tokenizer)
        and a token is masked when its bytes lie inside a model answer. SFT puts its loss on
        exactly these tokens; `<bos>`, turn headers and the "\\n" after `<end_of_turn>` never are.
        """
        text, spans = "", []
        for role, content in _turns(messages, add_generation_prompt, merge_system):
            text += f"{START_OF_TURN}{role}\n"
            begin = len(text.encode("utf-8"))
            text += f"{content}{END_OF_TURN}"
            if role == "model":
                spans.append((begin, len(text.encode("utf-8"))))
            text += "\n"
        if add_generation_prompt:
            text += f"{START_OF_TURN}model\n"
        # Offsets are bytes of `text`. Byte-fallback pieces of one character all but the last
        # have an empty span at the character's start, so `p.begin < end` keeps an empty piece
        # that sits at an answer's end out of that answer.
        pieces = self.processor.encode(text, return_type="proto").pieces
        mask = [any(b <= p.begin and p.end <= e and p.begin < e for b, e in spans) for p in pieces]
        return [BOS_ID, *(p.id for p in pieces)], [False, *mask]


def _turns(
    messages: Sequence[Message], add_generation_prompt: bool, merge_system: bool
) -> list[tuple[str, str]]:
    """(gemma role, stripped content) per turn, checked like the HF template."""
    turns: list[tuple[str, str]] = []
    system: str | None = None
    for index, message in enumerate(messages):
        if "role" not in message or "content" not in message:
            raise ValueError(f"message {index} needs 'role' and 'content', got {sorted(message)}")
        role, content = message["role"], message["content"]
        if not isinstance(content, str):
            raise ValueError(f"message {index} content must be a str, got {type(content).__name__}")
        if role == "system":
            if not merge_system:
                raise ValueError(
                    "Gemma has no system role; pass merge_system=True to prepend the system "
                    "text to the first user turn"
                )
            if index != 0:
                raise ValueError(f"a system message must come first, found one at {index}")
            system = content.strip()
            continue
        if role not in _ROLES:
            raise ValueError(f"message {index} has role {role!r}; expected user/assistant/model")
        expected = "user" if len(turns) % 2 == 0 else "model"
        if _ROLES[role] != expected:
            raise ValueError(
                f"message {index} is a {_ROLES[role]} turn where a {expected} turn is due; "
                "turns must alternate user/model starting with user"
            )
        content = content.strip()
        if system is not None:
            content, system = (f"{system}\n\n{content}" if system else content), None
        turns.append((_ROLES[role], content))
    if not turns:
        raise ValueError("a chat needs at least one user message")
    if add_generation_prompt and turns[-1][0] != "user":
        raise ValueError("add_generation_prompt needs the last turn to be a user turn")
    return turns
