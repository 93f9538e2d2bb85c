"""Turning what a caller sends (text, chat messages, token ids) into the prompt's token ids.

Kept apart from the engine loop: it runs on the caller's thread, needs only the tokenizer, and is
where chat-template rendering (roles, tools) grows without touching scheduling code.

Chat messages arrive in OpenAI's shape with string content. Templates differ in what they know:
an assistant turn's ``tool_calls`` go to templates that render them with their arguments as a
dict (what Hugging Face templates index into; OpenAI sends a JSON string); a template that never
mentions ``tool_calls`` (SmolLM2's, for one) gets them written into the turn's text as Hermes-style
``<tool_call>`` blocks instead, so that a conversation's history is not silently cut short. In the
same way, a template that never mentions ``tools`` gets the tool list in its system message, with
the Hermes-style answer format that serve/tool_calls.py parses back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError

from openlora_ray.errors import InvalidRequestError

# Template variables a caller's chat_template_kwargs may not override.
_RESERVED = frozenset(
    {"messages", "tools", "add_generation_prompt", "continue_final_message", "tokenize", "return_dict"}
)


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation to render through the model's chat template (picklable: it crosses Ray)."""

    messages: tuple[Mapping[str, Any], ...]
    tools: tuple[Mapping[str, Any], ...] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)


Prompt = str | Sequence[int] | Sequence[dict[str, Any]] | ChatPrompt


def encode_prompt(tokenizer: Any, vocab_size: int, prompt: Prompt) -> list[int]:
    """Token ids from text, chat messages (through the chat template) or ids as given."""
    if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], Mapping):
        prompt = ChatPrompt(messages=tuple(prompt))
    if isinstance(prompt, (str, ChatPrompt)):
        if tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer; send token ids")
        if isinstance(prompt, str):
            return tokenizer(prompt).input_ids
        return render_chat(tokenizer, prompt)
    ids = [int(t) for t in prompt]
    if any(not 0 <= t < vocab_size for t in ids):
        raise InvalidRequestError(f"token ids must be in [0, {vocab_size})")
    return ids


def render_chat(tokenizer: Any, chat: ChatPrompt) -> list[int]:
    """The conversation's token ids; a template that refuses the messages is the caller's 400."""
    if chat.add_generation_prompt and chat.continue_final_message:
        raise InvalidRequestError("'add_generation_prompt' and 'continue_final_message' cannot both be true")
    if chat.continue_final_message and (not chat.messages or chat.messages[-1].get("role") != "assistant"):
        raise InvalidRequestError("'continue_final_message' needs an assistant message last")
    template = tokenizer.chat_template or ""
    messages = [_for_template(m, "tool_calls" in template) for m in chat.messages]
    if chat.tools and "tools" not in template:
        messages = _with_tools_described(messages, chat.tools)
    extra = {k: v for k, v in chat.template_kwargs.items() if k not in _RESERVED}
    try:
        rendered = tokenizer.apply_chat_template(
            messages,
            tools=[dict(t) for t in chat.tools] if chat.tools else None,
            add_generation_prompt=chat.add_generation_prompt,
            continue_final_message=chat.continue_final_message,
            tokenize=True,
            return_dict=True,
            **extra,
        )
    except (TemplateError, ValueError, TypeError) as e:
        raise InvalidRequestError(f"the model's chat template cannot render these messages: {e}") from None
    return list(rendered["input_ids"])


def _for_template(message: Mapping[str, Any], template_renders_calls: bool) -> dict[str, Any]:
    out = dict(message)
    calls = out.get("tool_calls")
    if not calls:
        return out
    if template_renders_calls:
        out["tool_calls"] = [_with_dict_arguments(c) for c in calls]
        return out
    blocks = [json.dumps({"name": c["function"]["name"], "arguments": _arguments(c)}) for c in calls]
    text = "\n".join(f"<tool_call>\n{b}\n</tool_call>" for b in blocks)
    out["content"] = f"{out.get('content') or ''}\n{text}".lstrip("\n")
    del out["tool_calls"]
    return out


def _with_tools_described(messages: list[dict[str, Any]], tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The tools, and how to call them, at the end of the system message (one is added if none)."""
    listing = "\n".join(json.dumps(dict(t), ensure_ascii=False) for t in tools)
    text = (
        "These tools are available, described as JSON:\n<tools>\n" + listing + "\n</tools>\n"
        "To use a tool, answer with one block per call, holding a JSON object with the tool's name "
        'and its arguments:\n<tool_call>\n{"name": "<tool name>", "arguments": {<arguments>}}\n</tool_call>'
    )
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "content": f"{messages[0].get('content') or ''}\n\n{text}".lstrip()}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _arguments(call: Mapping[str, Any]) -> Any:
    raw = call["function"].get("arguments", "{}")
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw  # arguments a model produced that are not JSON: kept verbatim


def _with_dict_arguments(call: Mapping[str, Any]) -> dict[str, Any]:
    return {**call, "function": {**call["function"], "arguments": _arguments(call)}}
