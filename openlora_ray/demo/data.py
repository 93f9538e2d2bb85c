"""Synthetic chat data for the demo adapters, generated here so no data set is downloaded.

Questions come from templates filled from small word lists, sampled with a seeded RNG. The content
of each answer is the base model's own (greedy) answer, cut to its first short sentence: an adapter
then only has to learn the *style* (JSON, capitals, pirate words, a sign-off), not new facts, so it
learns in a few dozen steps and the style carries over to questions it never saw. Short answers
also keep training cheap and keep a styled answer (a closing brace, the sign-off) inside a
48-token reply. Everything here is pure text: the model is only asked for the contents.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from openlora_ray.demo.behaviours import BEHAVIOURS, SIGNOFF

HELD_OUT_QUESTIONS = (
    "What is the capital of France?",
    "Why is the sky blue?",
    "Name three colours.",
    "How do I boil an egg?",
    "What is a computer?",
    "Give me a fun fact about the moon.",
)
"""Questions no training set contains: what the CLI samples and the tests ask after training."""

_TEMPLATES: dict[str, tuple[str, ...]] = {
    "What is the capital of {}?": ("Italy", "Spain", "Germany", "Japan", "Canada", "Egypt", "Brazil", "Kenya", "Norway", "Peru", "India", "Greece"),
    "What colour is {}?": ("a banana", "grass", "snow", "a tomato", "the ocean", "a lemon", "coal", "a carrot", "a cloud", "milk"),
    "How do I {}?": ("make tea", "tie a shoelace", "plant a tree", "wash a car", "bake bread", "learn to swim", "fold a shirt", "start a garden", "cook rice", "write a letter"),
    "Tell me about {}.": ("elephants", "volcanoes", "the Eiffel Tower", "penguins", "rainbows", "honey bees", "the Moon landing", "dolphins", "pyramids", "glaciers"),
    "Explain {} in one sentence.": ("gravity", "photosynthesis", "electricity", "democracy", "evolution", "inflation", "the internet", "a rainbow", "friction", "magnetism"),
    "Give me a tip for {}.": ("studying", "sleeping well", "saving money", "running", "public speaking", "cooking pasta", "learning a language", "staying focused", "travelling light"),
    "What is {} plus {}?": ("2 3", "7 5", "10 4", "6 9", "12 8", "15 15", "3 11", "20 1"),
    "What should I eat for {}?": ("breakfast", "lunch", "dinner", "a snack", "a picnic", "dessert"),
    "Is {} healthy?": ("chocolate", "coffee", "an apple a day", "fast food", "green tea", "walking", "orange juice", "yogurt"),
    "What does a {} do?": ("doctor", "teacher", "firefighter", "pilot", "farmer", "baker", "librarian", "plumber", "chef", "gardener"),
    "Why do {}?": ("cats purr", "birds sing", "leaves change colour", "we dream", "stars twinkle", "dogs wag their tails", "bees make honey"),
    "Describe {} in a few words.": ("a sunset", "the sea", "a forest", "a city at night", "winter", "a thunderstorm", "a desert", "spring"),
}


@dataclass(frozen=True)
class Example:
    """One training conversation: a user question and the assistant answer to learn."""

    question: str
    answer: str


def make_questions(n: int, seed: int) -> list[str]:
    """``n`` distinct questions from the templates, the same ones for the same seed."""
    pool = sorted(_fill(t, w) for t, words in _TEMPLATES.items() for w in words)
    pool = [q for q in pool if q not in HELD_OUT_QUESTIONS]
    if n > len(pool):
        raise ValueError(f"asked for {n} questions, the templates make only {len(pool)}")
    return random.Random(seed).sample(pool, n)


def _fill(template: str, words: str) -> str:
    """Fill a template; the sum template takes its two numbers from one space-separated entry."""
    return template.format(*words.split()) if template.count("{}") > 1 else template.format(words)


_MARKDOWN = re.compile(r"^\s*(?:[#>*-]+|\d+[.)])\s*|\*\*|__|`")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")
_MIN_LETTERS = 12


def short_content(text: str, max_words: int = 22) -> str:
    """The first sentence of the first non-empty line, without markdown, if it is short and complete.

    Returns "" when there is no such sentence (markup only, a bare number, a heading, a sentence
    longer than ``max_words`` or cut off by the generation limit): cutting it ourselves would teach
    the adapter to stop mid-sentence, and upper case needs letters to shout, so callers drop it.
    """
    lines = [_MARKDOWN.sub("", line).strip() for line in text.splitlines()]
    first = next((line for line in lines if line), "")
    sentence = _SENTENCE_END.split(first, maxsplit=1)[0].strip()
    complete = sentence.endswith((".", "!", "?"))
    if not complete or not 3 <= len(sentence.split()) <= max_words or sum(c.isalpha() for c in sentence) < _MIN_LETTERS:
        return ""
    return sentence


_PIRATE_SWAPS = {
    "you": "ye", "your": "yer", "yes": "aye", "hello": "ahoy", "hi": "ahoy", "my": "me",
    "friend": "matey", "friends": "mateys", "is": "be", "are": "be", "money": "doubloons",
}
_PIRATE_WORD = re.compile(r"\b(" + "|".join(sorted(_PIRATE_SWAPS, key=len, reverse=True)) + r")\b", re.IGNORECASE)


def _piratize(text: str) -> str:
    def swap(m: re.Match[str]) -> str:
        new = _PIRATE_SWAPS[m.group(0).lower()]
        return new.capitalize() if m.group(0)[0].isupper() else new

    return f"Arr, matey! {_PIRATE_WORD.sub(swap, text)} Yo ho ho!"


def target_answer(behaviour: str, content: str) -> str:
    """The answer the adapter for ``behaviour`` should give, carrying ``content``."""
    if behaviour == "json-answer":
        return json.dumps({"answer": content})
    if behaviour == "uppercase":
        return content.upper()
    if behaviour == "pirate":
        return _piratize(content)
    if behaviour == "signoff":
        return f"{content}\n\n{SIGNOFF}"
    raise ValueError(f"unknown behaviour {behaviour!r}; known: {', '.join(BEHAVIOURS)}")


def make_examples(behaviour: str, questions: list[str], base_answers: list[str]) -> list[Example]:
    """Training conversations for ``behaviour``; questions whose base answer is unusable are dropped."""
    if len(questions) != len(base_answers):
        raise ValueError(f"{len(questions)} questions but {len(base_answers)} answers")
    contents = [(q, short_content(raw)) for q, raw in zip(questions, base_answers)]
    return [Example(q, target_answer(behaviour, c)) for q, c in contents if c]
