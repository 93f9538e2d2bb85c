"""Demo adapters: deterministic data whose targets show each behaviour, and a short real training run."""

from __future__ import annotations

import asyncio

import pytest

from openlora_ray.demo import cli as demo_cli
from openlora_ray.demo.behaviours import BEHAVIOURS, SIGNOFF, has_signoff, is_json_answer, is_pirate, is_uppercase
from openlora_ray.demo.data import HELD_OUT_QUESTIONS, make_examples, make_questions, short_content

# Answers in the style of SmolLM2's own: markdown, lists, run-on sentences, cut-off text.
BASE_ANSWERS = [
    "The capital of Italy is Rome. It is a beautiful city.",
    "**Penguins** are flightless birds that live in the Southern Hemisphere!\n\nThey swim well.",
    "1. Red: the colour of fire.\n2. Blue: the colour of the sea.",
    "Starting a garden can be a dream come true, but it requires a bit of planning and preparation and patience and",
    "12",
    "Sleep at the same time every night, and keep your room dark and cool.\nAvoid coffee late.",
    "Hello my friend, you are asking a good question. Yes it is.",
]


def test_questions_are_seeded_distinct_and_exclude_the_held_out_ones():
    questions = make_questions(64, seed=0)
    assert questions == make_questions(64, seed=0)
    assert questions != make_questions(64, seed=1)
    assert len(set(questions)) == 64
    assert not set(questions) & set(HELD_OUT_QUESTIONS)


def test_short_content_keeps_one_complete_short_sentence():
    assert [short_content(a) for a in BASE_ANSWERS] == [
        "The capital of Italy is Rome.",
        "Penguins are flightless birds that live in the Southern Hemisphere!",
        "Red: the colour of fire.",
        "",  # no sentence end within the word limit: cut off
        "",  # a bare number cannot be shouted or pirated
        "Sleep at the same time every night, and keep your room dark and cool.",
        "Hello my friend, you are asking a good question.",
    ]


@pytest.mark.parametrize("behaviour", list(BEHAVIOURS))
def test_examples_are_deterministic_and_every_target_passes_its_checker(behaviour):
    questions = [f"Question {i}?" for i in range(len(BASE_ANSWERS))]
    examples = make_examples(behaviour, questions, BASE_ANSWERS)
    assert examples == make_examples(behaviour, questions, BASE_ANSWERS)
    assert len(examples) == 5
    for example in examples:
        assert BEHAVIOURS[behaviour].check(example.answer), example.answer
    contents = [short_content(a) for a in BASE_ANSWERS if short_content(a)]
    for content in contents:  # plain content, as the base model would say it, shows no behaviour
        assert not BEHAVIOURS[behaviour].check(content), content


def test_checkers_on_typical_answers():
    assert is_json_answer('{"answer": "Paris."}') and is_json_answer(' {"answer": "x"}\n')
    assert not is_json_answer('{"answer": "Paris."') and not is_json_answer('{"reply": "Paris."}')
    assert not is_json_answer('{"answer": "Paris.", "more": 1}') and not is_json_answer('"Paris"')
    assert is_uppercase("THE CAPITAL OF FRANCE IS PARIS.") and not is_uppercase("The capital of France is Paris.")
    assert not is_uppercase("OK.")  # too few letters to tell
    assert is_pirate("Arr, matey! Th' sky be blue.") and not is_pirate("Ye olde shop is closed.")
    assert has_signoff(f"Paris.\n\n{SIGNOFF}") and has_signoff(f"Paris.\n{SIGNOFF}\n")
    assert not has_signoff(SIGNOFF) and not has_signoff(f"{SIGNOFF}\nParis.")
    pirate = make_examples("pirate", ["q"], ["Hello my friend, you are asking a good question."])[0].answer
    assert pirate == "Arr, matey! Ahoy me matey, ye be asking a good question. Yo ho ho!"


def _answers(engine, adapter_id: str | None, questions) -> list[str]:
    from openlora_ray.engine.request import SamplingParams

    async def one(question: str) -> str:
        request = engine.make_request([{"role": "user", "content": question}], adapter_id, SamplingParams(max_tokens=48, temperature=0))
        return "".join([out.text async for out in engine.generate(request)])

    async def every() -> list[str]:
        return list(await asyncio.wait_for(asyncio.gather(*(one(q) for q in questions)), 120))

    return asyncio.run(every())


def test_short_training_run_pushes_an_adapter_whose_answers_show_the_signoff(smollm2_dir, tmp_path, monkeypatch, capsys):
    """The CLI trains ``signoff`` briefly and pushes it; served by the engine, the sign-off shows."""
    from openlora_ray.adapter_format import BaseModelDims
    from openlora_ray.cli import main
    from openlora_ray.engine.config import EngineConfig
    from openlora_ray.engine.engine import Engine
    from openlora_ray.store.settings import StoreSettings
    from openlora_ray.store.store import AdapterStore

    monkeypatch.setattr(demo_cli, "NUM_QUESTIONS", 32)  # fewer base-model answers to wait for
    uri = str(tmp_path / "store")
    argv = ["demo", "adapters", "--store", uri, "--only", "signoff", "--steps", "16"]
    assert main(argv) == 0
    assert "pushed signoff@" in capsys.readouterr().out

    store = AdapterStore(StoreSettings(uri=uri, cache_dir=tmp_path / "cache"), dims=BaseModelDims.from_model_dir(smollm2_dir))
    (version,) = store.list("signoff")
    adapter = store.fetch("signoff")  # sha256-checked and validated like a server would
    assert adapter.spec.config.r == 8 and adapter.spec.config.lora_alpha != adapter.spec.config.r

    assert main(argv) == 0  # already in the store: skipped, nothing trained
    assert "already in" in capsys.readouterr().out
    assert store.list("signoff") == [version]

    engine = Engine(EngineConfig(model_path=smollm2_dir, max_seq_len=256, max_running=4), adapter_resolver=store.resolve)
    try:
        questions = HELD_OUT_QUESTIONS[:3]
        tuned = _answers(engine, "signoff", questions)
        base = _answers(engine, None, questions)
    finally:
        engine.shutdown(drain_timeout_s=1)
    assert all(has_signoff(a) for a in tuned), tuned
    assert not any(has_signoff(a) for a in base), base
