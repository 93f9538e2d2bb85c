"""Structured output and tool calls through HTTP with the official SDK and LangChain.

A tiny random model writes gibberish, but constrained decoding makes that gibberish valid JSON
under the schema every time: exactly what these tests assert (jsonschema), in batches mixed with
unconstrained rows and adapters, streamed and not. ``tool_choice: auto`` is different: the model
itself must decide to write a ``<tool_call>`` block, so those tests use an adapter trained to
(``caller``, see ``url``).
"""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import jsonschema
import pytest
from peft_helpers import save_peft_adapter, train_peft_adapter
from pydantic import BaseModel, Field

pytestmark = pytest.mark.timeout(300)

BASE = "tiny"
CHAT = [{"role": "user", "content": "Describe a person."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {"type": "object", "properties": {"sku": {"enum": ["a1", "b2"]}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                      "required": ["sku", "qty"], "additionalProperties": False},
            "minItems": 1,
            "maxItems": 3,
        },
        "paid": {"type": "boolean"},
        "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 6}]},
    },
    "required": ["items", "paid", "note"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TOOL_CHAT = [{"role": "user", "content": "Weather in Oslo?"}]
CALL = {"city": "Oslo", "unit": "C"}  # what the ``caller`` adapter answers TOOL_CHAT with WEATHER offered
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
                       "additionalProperties": False},
    },
}


@pytest.fixture(scope="module")
def url(serve_url: str, tiny_chat_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    from ray import serve

    from openlora_ray.serve.app import build
    from openlora_ray.serve.config import AppConfig
    from openlora_ray.store.settings import StoreSettings
    from openlora_ray.store.store import AdapterStore

    root = tmp_path_factory.mktemp("structured-store")
    (root / "adapters").mkdir()
    store = AdapterStore(StoreSettings(uri=str(root / "adapters"), cache_dir=root / "push-cache"))
    work = tmp_path_factory.mktemp("structured-adapters")
    store.push(save_peft_adapter(tiny_chat_model_dir, work / "alpha", 4, 8.0, ("q_proj", "v_proj"), 81), "alpha@v1")
    store.push(train_tool_caller(tiny_chat_model_dir, work / "caller"), "caller@v1")
    cfg = AppConfig(
        model=str(tiny_chat_model_dir),
        served_model_name=BASE,
        engine={"num_slots": 2, "max_rank": 8, "max_running": 8, "max_seq_len": 512, "torch_threads": 1},
        store={"uri": str(root / "adapters"), "cache_dir": str(tmp_path_factory.mktemp("node-cache"))},
        replicas={"num_replicas": 1, "num_cpus": 0, "num_gpus": 0, "stats_period_s": 0.5, "graceful_shutdown_timeout_s": 1},
        ingress_num_cpus=0,
        auth={"enabled": False},
    )
    serve.run(build(cfg), name="structured", route_prefix="/")
    return serve_url


def train_tool_caller(model_dir: Path, out: Path) -> Path:
    """An adapter that answers TOOL_CHAT, with WEATHER offered, by a Hermes ``<tool_call>`` block.

    Why a trained adapter: ``tool_choice: auto`` is tested honestly only if the model itself writes
    the call and the server parses it back, through the real engine. Neither the tiny random
    model nor the real SmolLM2-135M-Instruct ever does (tried: with the tools described in its
    system message, SmolLM2 answers about the weather, or writes Python). An assistant prefill
    (``continue_final_message``) would put the opening tag in the prompt, not in the output the
    parser reads. So a rank-8 LoRA is trained (~80 Adam steps, seconds) until greedy decoding of
    the exact prompt the server renders writes the block and then the end of the turn."""
    from transformers import AutoTokenizer

    from openlora_ray.engine.prompts import render_chat
    from openlora_ray.serve.openai_api import ChatCompletionRequest

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    request = ChatCompletionRequest.model_validate({"model": "caller", "messages": TOOL_CHAT, "tools": [WEATHER]})
    prompt = render_chat(tokenizer, request.chat_prompt())  # what every client below sends, rendered
    block = json.dumps({"name": "get_weather", "arguments": CALL})
    answer = tokenizer(f"<tool_call>\n{block}\n</tool_call>").input_ids + [tokenizer.eos_token_id]
    return train_peft_adapter(model_dir, out, [(prompt, answer)], r=8, alpha=16.0)


@pytest.fixture(scope="module")
def client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def json_schema_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_json_schema_outputs_validate_in_a_mixed_batch(client):
    """Several schemas (greedy and sampled, base model and adapter) at once with free rows: every
    constrained answer validates; the free rows answer what they answer alone."""
    free = {"messages": CHAT, "max_tokens": 12, "temperature": 0}
    alone = client.chat.completions.create(model=BASE, **free).choices[0].message.content
    cases = [
        (PERSON, BASE, 0.0),
        (ORDER, BASE, 1.0),
        (PERSON, "alpha", 1.0),
        (ORDER, "alpha", 0.0),
        ({"type": "object"}, BASE, 0.0),
    ]

    def constrained(case):
        schema, model, temperature = case
        r = client.chat.completions.create(
            model=model, messages=CHAT, max_tokens=200, temperature=temperature, seed=7,
            response_format=json_schema_format("out", schema) if schema != {"type": "object"} else {"type": "json_object"},
        )
        return schema, r.choices[0]

    with ThreadPoolExecutor(len(cases) + 2) as pool:
        plain = [pool.submit(client.chat.completions.create, model=BASE, **free) for _ in range(2)]
        answers = list(pool.map(constrained, cases))
    for schema, choice in answers:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)
    assert [p.result().choices[0].message.content for p in plain] == [alone, alone]


def test_structured_output_streams_and_vllm_guided_json(url, client):
    chunks = list(
        client.chat.completions.create(
            model="alpha", messages=CHAT, max_tokens=200, temperature=1.0, seed=3, stream=True, n=2,
            response_format=json_schema_format("person", PERSON),
        )
    )
    for index in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)
        jsonschema.validate(json.loads(text), PERSON)
    completion = client.completions.create(
        model=BASE, prompt="An order:", max_tokens=200, temperature=0, extra_body={"guided_json": ORDER}
    )
    jsonschema.validate(json.loads(completion.choices[0].text), ORDER)


def test_schemas_that_cannot_be_enforced_are_400_naming_the_problem(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="response_format.*strin"):
        client.chat.completions.create(
            model=BASE, messages=CHAT, max_tokens=8, response_format=json_schema_format("x", {"type": "strin"})
        )
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(
            model=BASE, messages=CHAT, max_tokens=8, tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "not_a_tool"}},
        )


def test_required_and_named_tool_choice_always_answer_valid_calls(client):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    for temperature, parallel in ((0.0, False), (1.0, True)):  # greedy gibberish repeats calls without end
        required = client.chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "Weather in Oslo?"}], max_tokens=250,
            temperature=temperature, seed=4, tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=parallel,
        ).choices[0]
        assert required.finish_reason == "tool_calls" and required.message.content is None
        assert required.message.tool_calls and (parallel or len(required.message.tool_calls) == 1)
        for call in required.message.tool_calls:
            assert call.id.startswith("call_") and call.type == "function"
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    named = client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "Time?"}], max_tokens=200, temperature=1.0, seed=2,
        tools=[WEATHER, CLOCK], tool_choice={"type": "function", "function": {"name": "get_time"}},
    ).choices[0]
    assert [c.function.name for c in named.message.tool_calls] == ["get_time"]
    jsonschema.validate(json.loads(named.message.tool_calls[0].function.arguments), schemas["get_time"])
    # With auto, the tiny model writes no <tool_call> block: a plain answer.
    auto = client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=6, temperature=0, tools=[WEATHER])
    assert auto.choices[0].message.tool_calls is None and auto.choices[0].finish_reason == "length"


def test_streamed_tool_calls_come_as_openai_deltas(client):
    chunks = list(
        client.chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "Weather?"}], max_tokens=200, temperature=0, stream=True,
            tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
    )
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    first, rest = deltas[0], deltas[1:]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather" and len(rest) >= 2  # arguments arrive in pieces
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    arguments = first.function.arguments + "".join(d.function.arguments for d in rest)
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    required = list(
        client.chat.completions.create(
            model=BASE, messages=[{"role": "user", "content": "Time?"}], max_tokens=200, temperature=0, stream=True,
            tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False,
        )
    )
    calls = [d for c in required if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert calls and all(d.id.startswith("call_") and d.function.name in ("get_weather", "get_time") for d in calls)


# ------------------------------------------------------------------------------- LangChain
class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user", "guest"]


def test_langchain_bind_tools_and_with_structured_output(url):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_time(zone: Literal["UTC", "CET"]) -> str:
        """The time in a zone."""
        return "noon"

    llm = ChatOpenAI(base_url=url + "/v1", api_key="unused", model="alpha", temperature=0, max_tokens=200, max_retries=0)
    message = llm.bind_tools([get_time], tool_choice="required", parallel_tool_calls=False).invoke("What time is it?")
    assert [c["name"] for c in message.tool_calls] == ["get_time"] and message.tool_calls[0]["args"]["zone"] in ("UTC", "CET")
    streamed = None
    for chunk in llm.bind_tools([get_time], tool_choice="get_time").stream("Time?"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.tool_calls[0]["name"] == "get_time" and streamed.tool_calls[0]["args"]["zone"] in ("UTC", "CET")
    for method in ("json_schema", "function_calling"):
        person = llm.with_structured_output(Person, method=method, strict=True).invoke("Describe a person as JSON.")
        assert isinstance(person, Person), method


# ------------------------------------------------------------------- tool_choice auto, end to end
def test_auto_tool_choice_turns_the_models_call_into_tool_calls(client):
    """The ``caller`` adapter writes a ``<tool_call>`` block of its own accord (greedy): it comes
    back as ``message.tool_calls``, and streamed as one call delta with its whole arguments;
    ``tool_choice: none`` leaves the tools out and parses nothing."""
    kw = dict(model="caller", messages=TOOL_CHAT, max_tokens=60, temperature=0, tools=[WEATHER])
    choice = client.chat.completions.create(**kw).choices[0]  # tool_choice left out: auto
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == CALL
    chunks = list(client.chat.completions.create(stream=True, tool_choice="auto", **kw))
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    [delta] = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert delta.index == 0 and delta.id.startswith("call_") and delta.function.name == "get_weather"
    assert json.loads(delta.function.arguments) == CALL
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    # tool_choice none: the tools stay out of the prompt (fewer tokens) and nothing is parsed.
    plain = client.chat.completions.create(**{**kw, "tool_choice": "none", "max_tokens": 4})
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason != "tool_calls"
    assert plain.usage.prompt_tokens < client.chat.completions.create(**{**kw, "max_tokens": 1}).usage.prompt_tokens
    # The call and its result go back as history (assistant tool_calls, a tool message): accepted.
    history = [*TOOL_CHAT, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 4}'}]
    follow_up = client.chat.completions.create(**{**kw, "messages": history, "max_tokens": 4})
    assert follow_up.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_langchain_bind_tools_and_litellm_with_tools_get_the_models_call(url):
    from langchain_openai import ChatOpenAI

    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # no download of the price list at import
    import litellm

    llm = ChatOpenAI(
        base_url=url + "/v1", api_key="unused", model="caller", temperature=0, max_tokens=60, max_retries=0
    )
    bound = llm.bind_tools([WEATHER])  # no tool_choice: auto
    message = bound.invoke(TOOL_CHAT[0]["content"])
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", CALL)] and not message.content
    streamed = None
    for chunk in bound.stream(TOOL_CHAT[0]["content"]):
        streamed = chunk if streamed is None else streamed + chunk
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [("get_weather", CALL)]

    litellm.telemetry = False
    kw = dict(model="openai/caller", api_base=url + "/v1", api_key="unused", messages=TOOL_CHAT, max_tokens=60,
              temperature=0, tools=[WEATHER])
    [call] = litellm.completion(**kw).choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == CALL
    deltas = [d for c in litellm.completion(stream=True, **kw) for d in c.choices[0].delta.tool_calls or ()]
    assert deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == CALL
    answer = asyncio.run(litellm.acompletion(**kw))
    assert json.loads(answer.choices[0].message.tool_calls[0].function.arguments) == CALL
