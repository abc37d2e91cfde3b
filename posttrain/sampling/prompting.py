"""Prompt objects (a string or chat turns) as the sampler sees them and as outputs show them."""

from __future__ import annotations

from posttrain.data.preferences import Prompt
from posttrain.tokenizer import GemmaTokenizer


def prompt_text(prompt: Prompt) -> str:
    """The user-visible text of a prompt (the last user turn of a chat; "" when it has none)."""
    if isinstance(prompt, str):
        return prompt
    user_turns = [turn["content"] for turn in prompt if turn["role"] == "user"]
    return user_turns[-1] if user_turns else ""


def encode_prompt(tokenizer: GemmaTokenizer, prompt: Prompt, chat: bool = True) -> list[int]:
    """Token ids of a prompt: chat-formatted with a generation header, or raw after <bos>."""
    if isinstance(prompt, str):
        if not chat:
            return tokenizer.encode(prompt, add_bos=True)
        prompt = [{"role": "user", "content": prompt}]
    return tokenizer.encode_chat(prompt, add_generation_prompt=True)
