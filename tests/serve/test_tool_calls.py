"""Structured output and tool-call requests, parsing and response shapes as pure functions."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from openlora_ray.engine.constraints import ConstraintSpec
from openlora_ray.errors import InvalidRequestError
from openlora_ray.serve.openai_api import ChatCompletionRequest, CompletionRequest
from openlora_ray.serve.openai_responses import (
    ChoiceResult,
    ChunkWriter,
    completion_response,
)
from openlora_ray.serve.tool_calls import (
    ArrayParser,
    HermesParser,
    NamedParser,
    shape_piece,
    shape_whole,
)

USER = [{"role": "user", "content": "hi"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "time"}}


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **kw})


def schema_of(request: ChatCompletionRequest | CompletionRequest) -> dict | None:
    spec = request.sampling(16).constraint
    return None if spec is None else json.loads(spec.json_schema)


def test_response_formats_and_vllm_extras_become_the_engines_constraint():
    assert schema_of(chat()) is None and schema_of(chat(response_format={"type": "text"})) is None
    assert schema_of(chat(response_format={"type": "json_object"})) == {"type": "object"}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    assert schema_of(chat(response_format=fmt)) == {**PERSON, "additionalProperties": False}  # strict: closed
    assert schema_of(chat(response_format={**fmt, "json_schema": {**fmt["json_schema"], "strict": False}})) == PERSON
    assert schema_of(chat(guided_json=PERSON)) == PERSON
    assert schema_of(CompletionRequest(model="m", prompt="x", guided_json=json.dumps(PERSON))) == PERSON
    assert schema_of(CompletionRequest(model="m", prompt="x", structured_outputs={"json": PERSON})) == PERSON
    completion_format = CompletionRequest(model="m", prompt="x", response_format={"type": "json_object"})
    assert schema_of(completion_format) == {"type": "object"}  # vLLM takes response_format on completions too
    # Equal schemas are one cache entry, however their keys are ordered.
    assert ConstraintSpec.for_schema({"b": 1, "a": 2}) == ConstraintSpec.for_schema({"a": 2, "b": 1})


@pytest.mark.parametrize(
    "kw, says",
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
         "response_format: .*strin"),
        ({"guided_json": {"properties": {"a": {"$ref": "#/$defs/gone"}}}}, "guided_json: .*gone"),
        ({"guided_json": "{not json"}, "guided_json: the JSON schema is not a JSON object"),
        ({"guided_json": PERSON, "response_format": {"type": "json_object"}}, "only one output constraint"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
         "only one output constraint"),
    ],
)
def test_schemas_that_cannot_be_enforced_are_refused_naming_the_problem(kw, says):
    with pytest.raises(InvalidRequestError, match=says):
        chat(**kw).sampling(16)


@pytest.mark.parametrize(
    "kw",
    [
        {"response_format": {"type": "json_schema"}},
        {"response_format": {"type": "xml"}},
        {"tool_choice": "required"},
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
        {"structured_outputs": {"regex": "a+"}},
    ],
)
def test_bad_formats_and_tool_choices_are_validation_errors(kw):
    with pytest.raises(ValidationError):
        chat(**kw)


def test_tool_choice_decides_the_prompt_the_constraint_and_the_parser():
    auto = chat(tools=[WEATHER, TIME])
    assert auto.chat_prompt().tools[0]["function"]["name"] == "weather"
    assert schema_of(auto) is None and isinstance(auto.call_parser("hermes"), HermesParser)
    assert auto.call_parser("none") is None
    none = chat(tools=[WEATHER], tool_choice="none")
    assert none.chat_prompt().tools is None and none.call_parser("hermes") is None
    named = chat(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "weather"}})
    closed = {**WEATHER["function"]["parameters"], "additionalProperties": False}  # declared parameters only
    assert schema_of(named) == closed and isinstance(named.call_parser("hermes"), NamedParser)
    required = chat(tools=[WEATHER, TIME], tool_choice="required")
    schema = schema_of(required)
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert [c["properties"]["name"] for c in schema["items"]["anyOf"]] == [{"const": "weather"}, {"const": "time"}]
    assert schema["items"]["anyOf"][1]["properties"]["arguments"] == {
        "type": "object", "properties": {}, "additionalProperties": False
    }
    # An object that says nothing of other keys is closed, nested ones too; one that allows them stays open.
    open_tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "object", "properties": {}}, "b": {"type": "object",
        "properties": {}, "additionalProperties": True}}}}}
    args = schema_of(chat(tools=[open_tool], tool_choice={"type": "function", "function": {"name": "f"}}))
    assert args["additionalProperties"] is False and args["properties"]["a"]["additionalProperties"] is False
    assert args["properties"]["b"]["additionalProperties"] is True
    assert isinstance(required.call_parser("hermes"), ArrayParser)


TEXT = (
    'Let me check.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
    '<tool_call>{"name": "time", "arguments": {}}</tool_call>\n'
)


@pytest.mark.parametrize("piece", [1, 2, 5, 11, len(TEXT)])
def test_hermes_blocks_become_calls_however_the_text_is_split(piece):
    parser = HermesParser()
    pieces = [TEXT[i : i + piece] for i in range(0, len(TEXT), piece)]
    items = [shape_piece(parser, {"text": p, "finish_reason": None}) for p in pieces]
    items.append(shape_piece(parser, {"text": "", "finish_reason": "stop"}))
    assert "".join(i["text"] for i in items) == "Let me check."
    calls = [c for i in items for c in i["tool_calls"] or ()]
    assert [(c["index"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        (0, "weather", {"city": "Oslo"}),
        (1, "time", {}),
    ]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert items[-1]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    "text, content, calls",
    [
        ("no calls, a < sign and <tool", "no calls, a < sign and <tool", []),
        ("<tool_call>{broken</tool_call>", "<tool_call>{broken</tool_call>", []),  # kept: nothing lost
        ('<tool_call>{"name": "f", "arguments": {"a": 1}}', None, [("f", {"a": 1})]),  # stopped before the tag
        ('<tool_call>{"name": "f", "arguments": {"a"', '<tool_call>{"name": "f", "arguments": {"a"', []),
    ],
)
def test_hermes_text_that_is_not_a_whole_call_stays_content(text, content, calls):
    whole = shape_whole(HermesParser(), {"text": text, "finish_reason": "stop"})
    assert whole["text"] == content
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole["tool_calls"] or ()]
    assert got == calls
    assert whole["finish_reason"] == ("tool_calls" if calls else "stop")


def test_forced_calls_parse_the_constrained_output():
    named = NamedParser("weather")
    first = shape_piece(named, {"text": '{"ci', "finish_reason": None})
    assert first["tool_calls"] == [
        {"index": 0, "id": first["tool_calls"][0]["id"], "type": "function",
         "function": {"name": "weather", "arguments": '{"ci'}}
    ]
    rest = shape_piece(named, {"text": 'ty": "Oslo"}', "finish_reason": "stop"})
    assert rest["tool_calls"] == [{"index": 0, "function": {"arguments": 'ty": "Oslo"}'}}]
    assert rest["finish_reason"] == "tool_calls"
    array = '[{"name": "weather", "arguments": {"city": "Oslo"}}, {"name": "time", "arguments": {}}]'
    whole = shape_whole(ArrayParser(), {"text": array, "finish_reason": "stop"})
    assert whole["text"] is None and [c["function"]["name"] for c in whole["tool_calls"]] == ["weather", "time"]
    cut = shape_whole(ArrayParser(), {"text": '[{"name": "wea', "finish_reason": "length"})
    assert cut["tool_calls"] is None and cut["text"] == '[{"name": "wea' and cut["finish_reason"] == "length"


def test_tool_calls_in_responses_and_chunks():
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    result = ChoiceResult(0, 0, None, "tool_calls", 3, 4, tool_calls=[call])
    message = completion_response("r", "m", [result], chat=True)["choices"][0]
    assert message["message"] == {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}
    assert message["finish_reason"] == "tool_calls"
    chunk = ChunkWriter("r", "m", True, 0).text(0, "", None, tool_calls=[{"index": 0, **call}])
    assert chunk["choices"][0]["delta"] == {"tool_calls": [{"index": 0, **call}]}
