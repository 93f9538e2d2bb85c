"""Helpers for engine tests: a transformers ``generate`` reference and stream collection."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import torch
from transformers import GenerationConfig

from openlora_ray.engine.engine import Engine
from openlora_ray.engine.request import GenerationRequest, StreamOutput


def hf_greedy(model: torch.nn.Module, prompt: Sequence[int], max_new_tokens: int, eos: int | None) -> list[int]:
    """transformers ``generate`` (greedy), cut after the first ``eos`` as the engine stops there."""
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
    out = model.generate(torch.tensor([list(prompt)]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), generation_config=cfg)
    new = out[0, len(prompt):].tolist()
    return new[: new.index(eos) + 1] if eos is not None and eos in new else new


async def collect(engine: Engine, request: GenerationRequest) -> tuple[list[int], str, StreamOutput]:
    tokens: list[int] = []
    text = ""
    last = None
    async for out in engine.generate(request):
        tokens += out.token_ids
        text += out.text
        last = out
    return tokens, text, last


async def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)
