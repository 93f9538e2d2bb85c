"""Greedy generation through the engine equals transformers / PEFT ``generate`` for every family.

The tiny models of ``family_models.py`` (windows shorter than the answers, Gemma 2's soft-caps,
Phi-3's fused projections and adapters on them, Mixtral's experts), loaded by the engine's own
loader; rows of different lengths, with different adapters (alpha != r, different targets) or
none, in one batch.
"""

from __future__ import annotations

import asyncio

import pytest
from engine_helpers import collect, hf_greedy
from family_models import adapter_targets, build, load_hf, random_tokens
from peft import PeftModel
from peft_helpers import save_peft_adapter

from openlora_ray.engine.config import EngineConfig
from openlora_ray.engine.request import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("family", ["qwen2", "qwen2-window", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "mixtral"])
async def test_greedy_tokens_equal_generate_with_and_without_adapters(engine_factory, tmp_path, family):
    path = build(family, tmp_path / "model")
    every, few = adapter_targets(family)
    dirs = {
        "every": save_peft_adapter(path, tmp_path / "every", r=8, alpha=4.0, targets=every, seed=61),
        "few": save_peft_adapter(path, tmp_path / "few", r=4, alpha=9.0, targets=few, seed=62),
    }
    config = EngineConfig(model_path=path, max_seq_len=64, max_rank=8, num_slots=2, kv_block_size=4, prefill_chunk=8)
    engine = engine_factory(config, dirs.__getitem__)
    plan = [("every", 3), (None, 10), ("few", 17), ("every", 9)]
    prompts = [random_tokens(n, seed=70 + i) for i, (_, n) in enumerate(plan)]
    results = await asyncio.gather(*(collect(engine, engine.make_request(p, a, GREEDY)) for (a, _), p in zip(plan, prompts)))
    refs = {a: PeftModel.from_pretrained(load_hf(path), d).eval() for a, d in dirs.items()} | {None: load_hf(path)}
    for (adapter, _), prompt, (got, _, _) in zip(plan, prompts, results):
        assert got == hf_greedy(refs[adapter], prompt, 12, eos=None), adapter
