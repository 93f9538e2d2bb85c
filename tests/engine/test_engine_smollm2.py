"""The engine on the real demo model: chat template, text, stop strings, and generate() equality."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine_helpers import collect, hf_greedy
from openlora_ray.engine.config import EngineConfig
from openlora_ray.engine.request import SamplingParams

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def smol_engine(smollm2_dir):
    from openlora_ray.engine.engine import Engine

    engine = Engine(EngineConfig(model_path=smollm2_dir, max_seq_len=256, max_running=4, prefill_chunk=16))
    yield engine
    engine.shutdown(drain_timeout_s=1)


async def test_greedy_chat_equals_transformers_generate_batched(smol_engine, smollm2_dir):
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    reqs = [smol_engine.make_request([{"role": "user", "content": q}], params=SamplingParams(max_tokens=24 + 6 * i, temperature=0)) for i, q in enumerate(QUESTIONS)]
    results = await asyncio.wait_for(asyncio.gather(*(collect(smol_engine, r) for r in reqs)), 120)
    for req, (tokens, text, last) in zip(reqs, results):
        assert tokens == hf_greedy(hf, req.prompt_ids, req.params.max_tokens, eos=smol_engine.tokenizer.eos_token_id)
        assert text == smol_engine.tokenizer.decode(tokens, skip_special_tokens=True)
    assert "Paris" in results[0][1]


async def test_stop_string_ends_the_text_before_it(smol_engine):
    prompt = [{"role": "user", "content": QUESTIONS[0]}]
    full, full_text, _ = await collect(smol_engine, smol_engine.make_request(prompt, params=SamplingParams(max_tokens=30, temperature=0)))
    stop = full_text[full_text.index("Paris") :][:4]  # "Pari": the stop string spans a token
    tokens, text, last = await collect(smol_engine, smol_engine.make_request(prompt, params=SamplingParams(max_tokens=30, temperature=0, stop=[stop])))
    assert last.finish_reason == "stop"
    assert text == full_text[: full_text.index(stop)]
    assert tokens == full[: len(tokens)] and len(tokens) < len(full)


async def test_max_tokens_gives_length_and_usage(smol_engine):
    req = smol_engine.make_request("Once upon a time", params=SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))
    tokens, text, last = await collect(smol_engine, req)
    assert last.finish_reason == "length" and last.completion_tokens == 7 == len(tokens)
    assert last.prompt_tokens == len(req.prompt_ids) and text
    assert last.time_to_first_token_s > 0 and last.mean_token_latency_s > 0
