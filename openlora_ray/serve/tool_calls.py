"""Tool calls on chat: OpenAI's ``tools``/``tool_choice``, and the model's calls parsed back.

``tool_choice`` decides how the model's text becomes ``tool_calls``:

- ``auto`` (the default with tools): the model decides. Its text is read by the model family's
  parser (``tool_call_parser`` in the config): ``hermes``, the ``<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>`` blocks of Hermes, Qwen 2.5/3, SmolLM3 and the templates
  written after them; ``none`` leaves the text as it is. Text outside the blocks is the content;
  a block that is not a call (bad JSON, no name) stays in the content, so nothing is lost.
- ``required``: the output is constrained (engine grammar) to a JSON array of one or more
  ``{"name": <a tool>, "arguments": <its parameters' schema>}``: always valid calls, whatever the
  template knows of tools (vLLM does the same).
- a named function: the output is constrained to that function's parameters: its arguments.
- ``none``: no tools in the prompt, no parsing.

Streamed, calls come as OpenAI's deltas: ``{index, id, type, function: {name, arguments: ""}}``
when a call starts, then ``{index, function: {arguments}}`` pieces. A named function's arguments
stream as the model writes them; a Hermes block is sent once its closing tag arrives, and a
``required`` array at the end (a call is known only when its JSON is whole).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from openlora_ray.serve.structured import closed_objects

ToolCallParser = Literal["hermes", "none"]
OPEN, CLOSE = "<tool_call>", "</tool_call>"


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def parameters(tool: Tool) -> dict[str, Any]:
    """The schema a forced call's arguments are held to: the tool's parameters, with every object
    that declares ``properties`` but says nothing of others closed to them. A function takes its
    declared parameters (OpenAI's strict mode demands ``additionalProperties: false`` for this
    reason), and an open object lets a weak model write made-up keys until max_tokens."""
    return closed_objects(tool.function.parameters or {"type": "object", "properties": {}})


def required_calls_schema(tools: Sequence[Tool], parallel: bool = True) -> dict[str, Any]:
    """One or more calls of the given tools (exactly one unless ``parallel``), each with arguments
    valid for that tool."""
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, "arguments": parameters(t)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
    return schema if parallel else {**schema, "maxItems": 1}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _start(index: int, name: str, arguments: str = "") -> dict[str, Any]:
    return {"index": index, "id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def _arguments(index: int, piece: str) -> dict[str, Any]:
    return {"index": index, "function": {"arguments": piece}}


def _call_of(value: Any) -> tuple[str, str] | None:
    """(name, arguments JSON) of a parsed ``{"name", "arguments"}`` object, or None if it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    return value["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


@dataclass
class Parsed:
    """What one piece of model text became: content to show, and tool-call deltas."""

    content: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)


class CallParser:
    """Turns a choice's text, piece by piece, into content and tool-call deltas (see the module)."""

    def __init__(self) -> None:
        self.count = 0  # calls started

    def feed(self, text: str) -> Parsed:
        raise NotImplementedError

    def finish(self) -> Parsed:
        return Parsed()


class HermesParser(CallParser):
    def __init__(self) -> None:
        super().__init__()
        self._buf = ""
        self._inside = False
        self._space = ""  # trailing whitespace held back: dropped before a call, shown before more text

    def feed(self, text: str) -> Parsed:
        self._buf += text
        out = Parsed()
        while True:
            if self._inside:
                end = self._buf.find(CLOSE)
                if end < 0:
                    return out
                self._block(self._buf[:end], out, closed=True)
                self._buf, self._inside = self._buf[end + len(CLOSE) :], False
                continue
            start = self._buf.find(OPEN)
            if start >= 0:
                self._content(self._buf[:start], out)
                self._space = ""
                self._buf, self._inside = self._buf[start + len(OPEN) :], True
                continue
            keep = _partial_suffix(self._buf, OPEN)  # might be the start of a tag: held back
            self._content(self._buf[: len(self._buf) - keep], out)
            self._buf = self._buf[len(self._buf) - keep :]
            return out

    def finish(self) -> Parsed:
        out = Parsed()
        if self._inside:  # the model stopped before the closing tag: a whole call is still a call
            self._block(self._buf, out, closed=False)
        else:
            rest = self._space + self._buf
            out.content += rest.rstrip() if self.count else rest
        self._buf = self._space = ""
        return out

    def _content(self, text: str, out: Parsed) -> None:
        text = self._space + text
        body = text.rstrip()
        self._space = text[len(body) :]
        out.content += body

    def _block(self, block: str, out: Parsed, closed: bool) -> None:
        try:
            call = _call_of(json.loads(block))
        except json.JSONDecodeError:
            call = None
        if call is None:
            out.content += f"{OPEN}{block}{CLOSE if closed else ''}"
            return
        out.calls.append(_start(self.count, call[0], call[1]))
        self.count += 1


class NamedParser(CallParser):
    """The whole output is the named function's arguments."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    def feed(self, text: str) -> Parsed:
        if not self.count:
            self.count = 1
            return Parsed(calls=[_start(0, self._name, text)])
        return Parsed(calls=[_arguments(0, text)] if text else [])


class ArrayParser(CallParser):
    """The whole output is a JSON array of ``{"name", "arguments"}`` (``tool_choice: required``)."""

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""

    def feed(self, text: str) -> Parsed:
        self._buf += text
        return Parsed()

    def finish(self) -> Parsed:
        try:
            items = json.loads(self._buf)
        except json.JSONDecodeError:
            return Parsed(content=self._buf)  # cut short (max_tokens): the text as it is
        calls = [_call_of(i) for i in items] if isinstance(items, list) else [None]
        if not calls or None in calls:
            return Parsed(content=self._buf)
        self.count = len(calls)
        return Parsed(calls=[_start(k, name, args) for k, (name, args) in enumerate(calls)])


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def shape_piece(parser: CallParser, item: dict[str, Any]) -> dict[str, Any]:
    """A replica increment with its text parsed: ``text`` the content, ``tool_calls`` the deltas,
    and ``finish_reason`` ``tool_calls`` when it ends a choice that made calls."""
    parsed = parser.feed(item["text"])
    reason = item["finish_reason"]
    if reason:
        rest = parser.finish()
        parsed = Parsed(parsed.content + rest.content, parsed.calls + rest.calls)
        if parser.count and reason == "stop":
            reason = "tool_calls"
    return {**item, "text": parsed.content, "tool_calls": parsed.calls or None, "finish_reason": reason}


def shape_whole(parser: CallParser, last: dict[str, Any]) -> dict[str, Any]:
    """A finished choice (its whole text) with its calls assembled, for a non-streamed answer."""
    shaped = shape_piece(parser, last)
    calls: dict[int, dict[str, Any]] = {}
    for delta in shaped["tool_calls"] or ():
        if delta["index"] in calls:
            calls[delta["index"]]["function"]["arguments"] += delta["function"]["arguments"]
        else:
            calls[delta["index"]] = {k: v for k, v in delta.items() if k != "index"}
    content = shaped["text"] if shaped["text"] or not calls else None
    return {**shaped, "text": content, "tool_calls": [calls[k] for k in sorted(calls)] or None}
