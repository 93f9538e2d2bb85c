"""The grammar library behind ``ConstraintCompiler``: llguidance.

Why llguidance (measured in /work/shared/notes/structured-output-libraries.md, CPU): no
dependencies (7.9 MB; xgrammar pulls triton and a CUDA torch), lazy compiles of about a
millisecond per schema (outlines-core: 5 s for ``{"type": "object"}``), the fastest 16-row step
(195 us fill + apply + accept), every probed JSON-schema keyword enforced but ``uniqueItems``
(refused at compile time rather than silently ignored), and steady releases. Its one trap: after
a refused token a matcher stays in error, which suits us (that row fails).

Compiled grammars are cached per schema text: a request gets a ``deep_copy`` of the pristine
matcher (microseconds), so repeated schemas never compile twice. The tokenizer's byte table is
built on first use (a second or two), so an engine that never sees a constrained request never
pays for it. No torch import here (masks are written through a pointer): the ingress imports
``json_grammar`` to check schemas.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import llguidance
import llguidance.hf

from openlora_ray.engine.constraints import ConstraintError, ConstraintSpec
from openlora_ray.errors import InvalidRequestError

# No whitespace between JSON tokens: a model (a small one above all) otherwise can spend its whole
# budget on spaces and newlines that the grammar allows forever.
JSON_OPTIONS = {"whitespace_flexible": False}
CACHED_GRAMMARS = 256


def json_grammar(spec: ConstraintSpec) -> str:
    """llguidance's grammar for ``spec``; ``InvalidRequestError`` names what is wrong with the
    schema (usable without a tokenizer: the ingress checks schemas before any replica work)."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(spec.json_schema, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise InvalidRequestError(f"the JSON schema is not a JSON object: {e}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidRequestError(f"the JSON schema cannot be enforced: {error}")
    return grammar


class GrammarConstraint:
    """One row's llguidance matcher (see ``TokenConstraint``)."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def fill_bitmask(self, bitmask: Any, row: int) -> None:
        target = bitmask[row]  # a contiguous row of a CPU int32 tensor, written in place
        self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * 4)

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise ConstraintError(f"the output constraint refused token {token}: {self._matcher.get_error()}")

    @property
    def finished(self) -> bool:
        return self._matcher.is_stopped()


class GrammarCompiler:
    """Matchers for ``ConstraintSpec``s over one tokenizer, their grammars cached by schema."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: frozenset[int]) -> None:
        if tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer, so its output cannot be constrained")
        self._hf = tokenizer
        self._vocab = vocab_size
        self._eos = sorted(eos_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()  # callers compile from any thread

    def compile(self, spec: ConstraintSpec) -> GrammarConstraint:
        with self._lock:
            pristine = self._cache.get(spec.json_schema)
            if pristine is None:
                pristine = llguidance.LLMatcher(self._llg_tokenizer(), json_grammar(spec), log_level=0)
                if pristine.is_error():
                    raise InvalidRequestError(f"the JSON schema cannot be enforced: {pristine.get_error()}")
                self._cache[spec.json_schema] = pristine
                if len(self._cache) > CACHED_GRAMMARS:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(spec.json_schema)
            return GrammarConstraint(pristine.deep_copy())

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            # n_vocab = the logits' width: ids past the tokenizer's own vocabulary are never allowed.
            self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self._vocab, eos_token=self._eos or None)
        return self._tokenizer
