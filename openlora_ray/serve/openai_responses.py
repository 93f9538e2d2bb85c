"""OpenAI's response shapes: bodies, stream chunks, server-sent events and the error body.

Plain dicts in OpenAI's documented format (what the SDKs parse); nothing here knows of Ray or of
FastAPI, so the shapes are tested as pure functions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

OWNER = "openlora-ray"
DONE = "data: [DONE]\n\n"


def error_body(message: str, type_: str, code: str | int | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True)
class ChoiceResult:
    """A finished choice: its index, text and the engine's last increment's counters."""

    index: int
    prompt_index: int
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def total_usage(results: Sequence[ChoiceResult]) -> dict[str, int]:
    """OpenAI's counting: each prompt's tokens once (however many choices), every choice's output."""
    prompts = {r.prompt_index: r.prompt_tokens for r in results}
    return usage(sum(prompts.values()), sum(r.completion_tokens for r in results))


def completion_response(rid: str, model: str, results: Sequence[ChoiceResult], chat: bool) -> dict[str, Any]:
    choices = []
    for r in sorted(results, key=lambda r: r.index):
        choice: dict[str, Any] = {"index": r.index, "finish_reason": _finish(r.finish_reason), "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": r.text, "refusal": None}
        else:
            choice["text"] = r.text
        choices.append(choice)
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": total_usage(results),
    }


def _finish(reason: str | None) -> str | None:
    """OpenAI knows stop and length; an aborted request ends like one cut short."""
    return "length" if reason == "abort" else reason


@dataclass(frozen=True)
class ChunkWriter:
    """Stream chunks of one response: every chunk carries its choice's ``index``."""

    rid: str
    model: str
    chat: bool
    created: int

    def _chunk(self, choices: list[dict[str, Any]], u: dict[str, int] | None = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.rid,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if u is not None:
            chunk["usage"] = u
        return chunk

    def role(self, index: int) -> dict[str, Any]:
        """Chat only: the first chunk of a choice names the speaker."""
        return self._chunk(
            [{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}]
        )

    def text(self, index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            delta = {"content": text} if text else {}
            choice = {"index": index, "delta": delta, "finish_reason": _finish(finish_reason), "logprobs": None}
        else:
            choice = {"index": index, "text": text, "finish_reason": _finish(finish_reason), "logprobs": None}
        return self._chunk([choice])

    def usage(self, u: dict[str, int]) -> dict[str, Any]:
        """The last chunk with ``stream_options.include_usage``: no choices, the whole usage."""
        return self._chunk([], u)


def model_card(model_id: str, created: int, parent: str | None = None) -> dict[str, Any]:
    card: dict[str, Any] = {"id": model_id, "object": "model", "created": created, "owned_by": OWNER}
    if parent is not None:
        card["parent"] = parent
    return card
