"""Structured output requests: OpenAI's ``response_format`` and vLLM's ``guided_json`` and
``structured_outputs``, turned into the engine's ``ConstraintSpec``.

Schemas are checked here, before any replica work (llguidance compiles a schema without a
tokenizer in about a millisecond), so a schema it cannot enforce is a 400 that names the problem.
The output is always constrained to the schema; ``strict: true`` also closes every object that
declares ``properties`` but says nothing of other keys (OpenAI's strict mode refuses such schemas;
we read them as meant), so a weak model cannot fill its budget with made-up keys.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from openlora_ray.engine.constraints import ConstraintSpec
from openlora_ray.engine.grammar import json_grammar
from openlora_ray.errors import InvalidRequestError

JSON_OBJECT: dict[str, Any] = {"type": "object"}  # OpenAI's json_object mode: any JSON object


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object with 'name' and 'schema'")
        return self

    def target_schema(self) -> dict[str, Any] | None:
        if self.type == "json_object":
            return JSON_OBJECT
        if self.type == "json_schema":
            assert self.json_schema is not None
            schema = self.json_schema.schema_ or JSON_OBJECT
            return closed_objects(schema) if self.json_schema.strict else schema
        return None


def closed_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` in every object schema that declares
    ``properties`` and leaves other keys unsaid (one that allows them stays open)."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_objects(v) for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs``: only its ``json`` (a schema) is implemented here."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(None, alias="json")


def checked(schema: dict[str, Any] | str, where: str) -> ConstraintSpec:
    """The spec for ``schema`` (a dict, or a JSON text as vLLM allows), refused with a 400 naming
    ``where`` when it is not a schema llguidance can enforce."""
    spec = ConstraintSpec(json_schema=schema) if isinstance(schema, str) else ConstraintSpec.for_schema(schema)
    try:
        json_grammar(spec)
    except InvalidRequestError as e:
        raise InvalidRequestError(f"{where}: {e}") from None
    return spec
