"""The demo adapters' behaviours and a pure checker for each.

Every demo adapter teaches SmolLM2 one habit that a person spots in a single answer. The checkers
decide, from the answer text alone, whether the habit shows; the data generator asserts its own
targets pass them, the tests assert a trained adapter's answers pass them and the base model's do
not, and the HTTP tests reuse them against a running server. They import nothing heavy on purpose.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

SIGNOFF = "-- Sent from openlora-ray"
"""The fixed last line of every ``signoff`` answer."""

PIRATE_WORDS = frozenset({"arr", "arrr", "ahoy", "matey", "mateys", "ye", "yer", "aye", "avast", "hearty", "landlubber", "shiver", "timbers"})

_WORD = re.compile(r"[a-z]+")


def is_json_answer(text: str) -> bool:
    """The whole answer is one JSON object ``{"answer": <string>}`` and nothing else."""
    try:
        value = json.loads(text.strip())
    except ValueError:
        return False
    return isinstance(value, dict) and list(value) == ["answer"] and isinstance(value["answer"], str) and bool(value["answer"].strip())


def is_uppercase(text: str, min_letters: int = 8, min_share: float = 0.95) -> bool:
    """At least ``min_letters`` letters, almost all of them capitals.

    A small share of lower case is tolerated because a 135M model occasionally emits a lower-case
    token (a unit, a name) inside an otherwise shouted answer; ordinary prose is far below 95%.
    """
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= min_letters and sum(c.isupper() for c in letters) >= min_share * len(letters)


def pirate_word_count(text: str) -> int:
    """How many words of the answer are pirate words (``arr``, ``matey``, ``ye``...)."""
    return sum(w in PIRATE_WORDS for w in _WORD.findall(text.lower()))


def is_pirate(text: str, min_words: int = 2) -> bool:
    """At least two pirate words: one stray "ye" in a poem is not pirate speech."""
    return pirate_word_count(text) >= min_words


def has_signoff(text: str) -> bool:
    """The last non-empty line is exactly :data:`SIGNOFF` and there is an answer above it."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return len(lines) >= 2 and lines[-1] == SIGNOFF


@dataclass(frozen=True)
class Behaviour:
    """One demo adapter: its store name, what a person should see, and how to check it."""

    name: str
    description: str
    check: Callable[[str], bool]


BEHAVIOURS: dict[str, Behaviour] = {
    b.name: b
    for b in (
        Behaviour("json-answer", 'answers as a JSON object {"answer": "..."}', is_json_answer),
        Behaviour("uppercase", "answers in upper case", is_uppercase),
        Behaviour("pirate", "answers in pirate speech (arr, matey, ye)", is_pirate),
        Behaviour("signoff", f"ends every answer with the line {SIGNOFF!r}", has_signoff),
    )
}
"""Every demo adapter by name, in training order."""
