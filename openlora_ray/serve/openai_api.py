"""OpenAI's request and response shapes for completions and chat, and their error body.

Requests are pydantic models (unknown fields are ignored, as OpenAI clients send many optional
ones); responses and stream chunks are plain dicts in OpenAI's documented format.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from openlora_ray.engine.request import SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    n: int = Field(1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)

    @field_validator("n")
    @classmethod
    def _single_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported; send several requests instead")
        return n

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.max_tokens or default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=stop,
            repetition_penalty=self.repetition_penalty,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[int]


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        params = super().sampling(default_max_tokens)
        if self.max_completion_tokens and not self.max_tokens:
            return params.model_copy(update={"max_tokens": self.max_completion_tokens})
        return params


def error_body(message: str, type_: str, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, model: str, text: str, finish: str, u: dict, chat: bool) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()), "model": model, "choices": [choice], "usage": u}


def stream_chunk(rid: str, model: str, text: str | None, finish: str | None, chat: bool, role: bool = False, u: dict | None = None) -> dict[str, Any]:
    """One SSE payload; ``text=None`` with ``u`` set is the final usage-only chunk."""
    choices: list[dict[str, Any]] = []
    if text is not None or finish is not None or role:
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text:
                delta["content"] = text
            choices.append({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None})
        else:
            choices.append({"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None})
    chunk: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()), "model": model, "choices": choices}
    if u is not None:
        chunk["usage"] = u
    return chunk
