"""Turning what a caller sends (text, chat messages, token ids) into the prompt's token ids.

Kept apart from the engine loop: it runs on the caller's thread, needs only the tokenizer, and is
where chat-template rendering (roles, tools) grows without touching scheduling code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from openlora_ray.errors import InvalidRequestError

Prompt = str | Sequence[int] | Sequence[dict[str, Any]]


def encode_prompt(tokenizer: Any, vocab_size: int, prompt: Prompt) -> list[int]:
    """Token ids from text, chat messages (through the chat template) or ids as given."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], dict)):
        if tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer; send token ids")
        if isinstance(prompt, str):
            return tokenizer(prompt).input_ids
        rendered = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(rendered["input_ids"])
    ids = [int(t) for t in prompt]
    if any(not 0 <= t < vocab_size for t in ids):
        raise InvalidRequestError(f"token ids must be in [0, {vocab_size})")
    return ids
