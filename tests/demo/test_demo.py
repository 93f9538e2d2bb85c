"""Demo adapters: deterministic data whose targets show each behaviour, and a short real training run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from serve_helpers import free_port, wait_for

from openlora_ray.demo import cli as demo_cli
from openlora_ray.demo.behaviours import BEHAVIOURS, SIGNOFF, has_signoff, is_json_answer, is_pirate, is_uppercase
from openlora_ray.demo.data import HELD_OUT_QUESTIONS, make_examples, make_questions, short_content
from openlora_ray.demo.models import DEMO_MODELS
from openlora_ray.model.prepare import DEMO_MODEL_NAME, MODELS

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


def test_every_demo_model_is_preparable_and_trains_known_behaviours():
    assert set(DEMO_MODELS) <= set(MODELS) and DEMO_MODEL_NAME in DEMO_MODELS
    for demo in DEMO_MODELS.values():
        assert demo.adapters and set(demo.adapters) <= set(BEHAVIOURS)
        if demo.content_prompt is not None:  # a plain completion prompt ending where the answer starts
            assert demo.content_prompt.format(question="Q?").endswith("Question: Q?\nAnswer:")


@pytest.mark.parametrize(("argv", "model", "adapters", "store"), [
    ([], DEMO_MODEL_NAME, list(BEHAVIOURS), "store"),
    (["--model", "gemma3-270m"], "gemma3-270m", ["json-answer"], "store-gemma3-270m"),
    (["--model", "gemma3-270m", "--only", "pirate", "--store", "{tmp}/mine"], "gemma3-270m", ["pirate"], "mine"),
])
def test_model_picks_the_base_its_default_adapters_and_its_store(
    argv, model, adapters, store, tiny_model_dir, tmp_path, monkeypatch
):
    """``demo adapters --model``: what is prepared, trained and where it is pushed (training itself replaced)."""
    from openlora_ray.cli import main
    from openlora_ray.model import prepare

    monkeypatch.setenv("OPENLORA_CACHE", str(tmp_path))
    prepared: list[str] = []
    trained: list[tuple] = []

    def train(demo, model_dir, store, names, **kw) -> None:
        trained.append((demo.name, names, store.settings.uri))

    monkeypatch.setattr(prepare, "prepare_model", lambda name, *a, **kw: (prepared.append(name), tiny_model_dir)[1])
    monkeypatch.setattr(demo_cli, "_train_and_push", train)
    assert main(["demo", "adapters", *(a.format(tmp=tmp_path) for a in argv)]) == 0
    assert prepared == [model]
    assert trained == [(model, adapters, str(tmp_path / store))]


def _serve(store: str, port: int, log: Path) -> subprocess.Popen:
    """``openlora-ray serve`` as ``make run`` starts it (its own local Ray cluster), one replica."""
    argv = [sys.executable, "-m", "openlora_ray.cli", "serve", "--store", store, "--port", str(port), "--replicas", "1"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    with log.open("w") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)


def _chat(url: str, model: str, question: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 48, "temperature": 0}
    r = requests.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.mark.timeout(420)
def test_short_training_run_then_serve_shows_the_signoff_through_the_http_api(smollm2_dir, tmp_path, monkeypatch, capsys):
    """The CLI trains ``signoff`` briefly and pushes it; ``openlora-ray serve`` (the last step of
    ``make run``) serves it over HTTP, where its answers carry the sign-off and the base model's
    answers to the same questions do not; Ctrl-C shuts the server down cleanly."""
    from openlora_ray.adapter_format import BaseModelDims
    from openlora_ray.cli import main
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

    port, log = free_port(), tmp_path / "serve.log"
    server = _serve(uri, port, log)
    try:
        wait_for(lambda: "is serving on" in log.read_text() or server.poll() is not None, timeout=240, interval=1)
        assert server.poll() is None, log.read_text()[-3000:]
        url = f"http://127.0.0.1:{port}"
        assert {"signoff", "smollm2-135m-instruct"} <= {m["id"] for m in requests.get(f"{url}/v1/models", timeout=30).json()["data"]}
        questions = HELD_OUT_QUESTIONS[:3]
        tuned = [_chat(url, "signoff", q) for q in questions]
        base = [_chat(url, "smollm2-135m-instruct", q) for q in questions]
    finally:
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=90)
    assert code == 0, log.read_text()[-3000:]
    assert all(has_signoff(a) for a in tuned), tuned
    assert not any(has_signoff(a) for a in base), base
