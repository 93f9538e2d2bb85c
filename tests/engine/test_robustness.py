"""Failures stay with the request that caused them, and a broken engine says so."""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine_helpers import collect, wait_until
from openlora_ray.engine.config import EngineConfig
from openlora_ray.engine.request import SamplingParams

PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def prompt(seed: int) -> list[int]:
    return torch.randint(3, 256, (9,), generator=torch.Generator().manual_seed(seed)).tolist()


async def test_a_slot_write_that_raises_fails_only_its_request(engine_factory, tiny_model_dir, make_adapter):
    """Admission used to move the whole queue aside first: one exception there lost every request."""
    dirs = {name: make_adapter(f"rb-{name}", r=4, alpha=8.0, seed=80 + i) for i, name in enumerate(("ok1", "boom", "ok2"))}
    engine = engine_factory(EngineConfig(model_path=tiny_model_dir, max_seq_len=64, max_rank=8), dirs.__getitem__)
    write = engine.model.write_slot

    def failing_write(slot, weights):
        if weights.adapter_id == "boom":
            raise torch.OutOfMemoryError("simulated out of memory while writing a slot")
        write(slot, weights)

    engine.model.write_slot = failing_write
    results = await asyncio.wait_for(
        asyncio.gather(*(collect(engine, engine.make_request(prompt(i), a, PARAMS)) for i, a in enumerate(dirs)), return_exceptions=True), 60
    )
    assert isinstance(results[1], torch.OutOfMemoryError)
    for i in (0, 2):
        assert len(results[i][0]) == 12 and results[i][2].finish_reason == "length"
    await wait_until(lambda: engine.stats.running == 0 and engine.stats.free_kv_blocks == engine.stats.total_kv_blocks)
    assert engine.healthy()


async def test_an_engine_whose_steps_keep_failing_reports_unhealthy(engine_factory, tiny_model_dir):
    engine = engine_factory(EngineConfig(model_path=tiny_model_dir, max_seq_len=64))
    assert engine.healthy()

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")

    engine.runner.step = broken  # every forward of a step (prefill chunks join the decode rows)
    for i in range(3):
        with pytest.raises(RuntimeError, match="illegal memory access"):
            await collect(engine, engine.make_request(prompt(i), params=PARAMS))
    assert not engine.healthy()
