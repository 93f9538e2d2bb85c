"""Constrained decoding as the engine sees it: a spec in the request, a matcher per row.

A request that must produce output of a given shape (JSON that validates against a schema)
carries a ``ConstraintSpec``: plain data, so it crosses Ray inside ``SamplingParams``. The engine
turns it into a ``TokenConstraint`` through a ``ConstraintCompiler`` (the grammar library lives
behind that one interface, in ``engine/grammar.py``); each step the sampler asks every
constrained row for its bitmask of allowed next tokens (``engine/token_masks.py``), and the loop
tells the row which token was chosen. Nothing here imports torch or the grammar library, so the
ingress can build specs without either.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field


class ConstraintSpec(BaseModel):
    """Output that must be JSON valid under ``json_schema`` (a JSON text; ``{"type": "object"}``
    is OpenAI's ``json_object`` mode). Canonical text, so equal schemas share a compiled grammar."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    json_schema: str = Field(max_length=1 << 20)

    @classmethod
    def for_schema(cls, schema: dict[str, Any]) -> ConstraintSpec:
        return cls(json_schema=json.dumps(schema, sort_keys=True, separators=(",", ":")))


class ConstraintError(Exception):
    """A row's constraint failed (no allowed token left, a token it refused): that row fails alone."""


class TokenConstraint(Protocol):
    """One row's matcher: which tokens may come next, and the tokens that came."""

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        """Write row ``row`` of ``bitmask`` (a CPU int32 tensor ``(R, ceil(V / 32))``): bit ``t % 32``
        of word ``t // 32`` set = token ``t`` allowed."""

    def accept(self, token: int) -> None:
        """Advance past the sampled token; raises ``ConstraintError`` if the grammar refuses it."""

    @property
    def finished(self) -> bool:
        """The output is complete: nothing but the end of sequence may follow."""


class ConstraintCompiler(Protocol):
    def compile(self, spec: ConstraintSpec) -> TokenConstraint:
        """A fresh matcher for ``spec``; raises ``InvalidRequestError`` naming what is wrong with it."""
