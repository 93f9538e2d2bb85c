"""Constrained decoding in the engine: per-row JSON-schema grammars in a mixed batch."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
import torch
from engine_helpers import collect

from openlora_ray.engine.config import EngineConfig
from openlora_ray.engine.constraints import ConstraintError, ConstraintSpec
from openlora_ray.engine.grammar import GrammarCompiler
from openlora_ray.engine.request import SamplingParams
from openlora_ray.engine.token_masks import (
    apply_constraints,
    bitmasks,
    forbidden_tokens,
)
from openlora_ray.errors import InvalidRequestError

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
ITEMS = {
    "type": "array",
    "items": {"type": "object", "properties": {"sku": {"enum": ["a1", "b2"]}, "ok": {"type": "boolean"}},
              "required": ["sku", "ok"], "additionalProperties": False},
    "minItems": 1,
    "maxItems": 3,
}
FLAG = {"type": "object", "properties": {"flag": {"type": "boolean"}}, "required": ["flag"], "additionalProperties": False}


class _Fixed:
    """A constraint allowing a fixed set of tokens (the mask plumbing, without a grammar)."""

    def __init__(self, allowed: list[int]) -> None:
        self.allowed = allowed

    def fill_bitmask(self, bitmask, row):
        for t in self.allowed:
            bitmask[row, t // 32] |= torch.tensor(1 << (t % 32), dtype=torch.int64).to(torch.int32)

    def accept(self, token):  # pragma: no cover - not called by the mask
        pass

    finished = False


def test_masks_unpack_in_token_order_and_touch_only_constrained_rows():
    vocab = 100
    allowed = ~forbidden_tokens(bitmasks([_Fixed([0, 31, 32, 63, 99]), _Fixed([5])], vocab), vocab)
    assert allowed.shape == (2, vocab)
    assert allowed[0].nonzero().flatten().tolist() == [0, 31, 32, 63, 99]
    assert allowed[1].nonzero().flatten().tolist() == [5]
    logits = torch.randn(3, vocab)
    before = logits.clone()
    apply_constraints(logits, [None, _Fixed([7, 64]), None])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [7, 64]
    with pytest.raises(ConstraintError, match="no next token"):
        apply_constraints(logits, [None, _Fixed([])])
    every = torch.randn(2, vocab)  # every row constrained: masked in place
    apply_constraints(every, [_Fixed([1]), _Fixed([2, 3])])
    assert [torch.isfinite(r).nonzero().flatten().tolist() for r in every] == [[1], [2, 3]]


def test_invalid_schemas_name_the_problem(tiny_chat_model_dir):
    from transformers import AutoTokenizer

    compiler = GrammarCompiler(AutoTokenizer.from_pretrained(tiny_chat_model_dir), 49152, frozenset({2}))
    with pytest.raises(InvalidRequestError, match="strin"):
        compiler.compile(ConstraintSpec.for_schema({"type": "strin"}))
    with pytest.raises(InvalidRequestError, match="nope"):
        compiler.compile(ConstraintSpec.for_schema({"properties": {"a": {"$ref": "#/$defs/nope"}}}))
    with pytest.raises(InvalidRequestError, match="not a JSON object"):
        compiler.compile(ConstraintSpec(json_schema="[1, 2"))


@pytest.fixture
def engine(engine_factory, tiny_chat_model_dir):
    return engine_factory(EngineConfig(model_path=tiny_chat_model_dir, max_seq_len=256, max_running=8))


async def test_constrained_rows_validate_in_a_batch_with_free_rows(engine):
    """Several schemas, greedy and sampled, beside unconstrained rows: every constrained output
    parses and validates; the free rows generate exactly what they generate alone."""
    prompt = [{"role": "user", "content": "Describe a person."}]
    free = SamplingParams(max_tokens=24, temperature=0.0)
    alone = await collect(engine, engine.make_request(prompt, params=free))
    cases = [
        (schema, SamplingParams(max_tokens=160, temperature=t, seed=s, constraint=ConstraintSpec.for_schema(schema)))
        for schema, t, s in [(PERSON, 0.0, None), (ITEMS, 1.0, 3), (FLAG, 1.0, 4), ({"type": "object"}, 0.0, None)]
    ]
    runs = [engine.make_request(prompt, params=p) for _, p in cases] + [engine.make_request(prompt, params=free)]
    outs = await asyncio.gather(*(collect(engine, r) for r in runs))
    for (schema, _), (_, text, last) in zip(cases, outs[:-1]):
        assert last.finish_reason == "stop", text
        jsonschema.validate(json.loads(text), schema)
    assert outs[-1][0] == alone[0]


async def test_a_refused_token_fails_only_its_row(engine):
    """A grammar that only allows the end of sequence while min_tokens bans it dead-ends: that row
    fails with a clear error and the others finish."""
    prompt = [1, 2, 3]
    stuck = SamplingParams(max_tokens=8, temperature=0.0, min_tokens=8, constraint=ConstraintSpec.for_schema({"const": 1}))
    fine = SamplingParams(max_tokens=40, temperature=0.0, constraint=ConstraintSpec.for_schema(FLAG))
    plain = SamplingParams(max_tokens=8, temperature=0.0)
    results = await asyncio.gather(
        *(collect(engine, engine.make_request(prompt, params=p)) for p in (stuck, fine, plain)), return_exceptions=True
    )
    assert isinstance(results[0], InvalidRequestError) and "no next token" in str(results[0])
    assert json.loads(results[1][1]) in ({"flag": True}, {"flag": False})
    assert results[2][2].finish_reason == "length"


async def test_the_demo_model_answers_sensible_json_under_a_schema(engine_factory, smollm2_dir):
    """SmolLM2-135M-Instruct, greedy: the constrained answers validate and carry what was asked."""
    from openlora_ray.engine.prompts import ChatPrompt
    from openlora_ray.serve.tool_calls import Tool, parameters

    engine = engine_factory(EngineConfig(model_path=smollm2_dir, max_seq_len=512, max_running=4))
    person = {**PERSON, "properties": {**PERSON["properties"], "name": {"type": "string", "maxLength": 20}}}
    weather = Tool.model_validate({"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]},
    }})
    asks = [
        (ChatPrompt(messages=({"role": "user", "content": "Give me a person as JSON."},)), person),
        (ChatPrompt(messages=({"role": "user", "content": "What is the weather in Paris?"},),
                    tools=(weather.model_dump(exclude_none=True),)), parameters(weather)),
    ]
    requests = [
        engine.make_request(prompt, params=SamplingParams(max_tokens=40, temperature=0, constraint=ConstraintSpec.for_schema(s)))
        for prompt, s in asks
    ]
    (_, person_text, end), (_, args_text, _) = await asyncio.wait_for(
        asyncio.gather(*(collect(engine, r) for r in requests)), 240
    )
    assert end.finish_reason == "stop"
    jsonschema.validate(json.loads(person_text), person)
    args = json.loads(args_text)
    jsonschema.validate(args, parameters(weather))
    assert "Paris" in args["city"]
