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
    logprobs: Sequence[dict[str, Any]] | None = None  # the replica's entries, when asked for
    tool_calls: Sequence[dict[str, Any]] | None = None  # parsed from the text (serve/tool_calls.py)
    prompt_logprobs: Sequence[dict[str, Any] | None] | None = None  # vLLM's shape, when asked for


def logprobs_body(entries: Sequence[dict[str, Any]] | None, chat: bool, text_offset: int = 0) -> dict[str, Any] | None:
    """OpenAI's log-probability shapes from the replica's entries (token text, log probability, top
    alternatives). Chat: ``content[]`` with ``bytes`` (the token text's UTF-8). Completions:
    parallel lists, ``text_offset`` counted in characters from ``text_offset`` (the completion's
    start, or where the previous stream chunk ended)."""
    if entries is None:
        return None
    if chat:
        content = [
            {**_token(e["token"], e["logprob"]), "top_logprobs": [_token(t, v) for t, v in e["top"]]} for e in entries
        ]
        return {"content": content, "refusal": None}
    offsets, at = [], text_offset
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [None if e["top"] is None else dict((t, v) for t, v in e["top"]) for e in entries],
        "text_offset": offsets,
    }


def _token(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def total_usage(results: Sequence[ChoiceResult]) -> dict[str, int]:
    """OpenAI's counting: each prompt's tokens once (however many choices), every choice's output."""
    prompts = {r.prompt_index: r.prompt_tokens for r in results}
    return usage(sum(prompts.values()), sum(r.completion_tokens for r in results))


def completion_response(
    rid: str, model: str, results: Sequence[ChoiceResult], chat: bool, u: dict[str, int] | None = None
) -> dict[str, Any]:
    """The whole answer; ``u`` overrides the usage of ``results`` (best_of counts every candidate).
    vLLM's ``prompt_logprobs``, when asked for, are on each choice of completions (a choice per
    prompt) and at the top of chat's answer."""
    choices = []
    for r in sorted(results, key=lambda r: r.index):
        choice: dict[str, Any] = {
            "index": r.index,
            "finish_reason": _finish(r.finish_reason),
            "logprobs": logprobs_body(r.logprobs, chat),
        }
        if chat:
            choice["message"] = {"role": "assistant", "content": r.text, "refusal": None}
            if r.tool_calls:
                choice["message"]["tool_calls"] = list(r.tool_calls)
        else:
            choice["text"] = r.text
            if r.prompt_logprobs is not None:
                choice["prompt_logprobs"] = list(r.prompt_logprobs)
        choices.append(choice)
    body = {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": total_usage(results) if u is None else u,
    }
    scored = [r.prompt_logprobs for r in results if r.prompt_logprobs is not None]
    if chat and scored:  # vLLM puts chat's (one prompt) beside the choices
        body["prompt_logprobs"] = list(scored[0])
    return body


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

    def text(
        self,
        index: int,
        text: str,
        finish_reason: str | None,
        logprobs: dict[str, Any] | None = None,
        tool_calls: Sequence[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"content": text} if text else {}
            if tool_calls:
                delta["tool_calls"] = list(tool_calls)
            choice = {"index": index, "delta": delta, "finish_reason": _finish(finish_reason), "logprobs": logprobs}
        else:
            choice = {"index": index, "text": text, "finish_reason": _finish(finish_reason), "logprobs": logprobs}
        return self._chunk([choice])

    def usage(self, u: dict[str, int]) -> dict[str, Any]:
        """The last chunk with ``stream_options.include_usage``: no choices, the whole usage."""
        return self._chunk([], u)


def model_card(model_id: str, created: int, parent: str | None = None) -> dict[str, Any]:
    card: dict[str, Any] = {"id": model_id, "object": "model", "created": created, "owned_by": OWNER}
    if parent is not None:
        card["parent"] = parent
    return card
