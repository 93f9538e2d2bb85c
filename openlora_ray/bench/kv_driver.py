"""One engine serving one recorded workload in real time, in a process of its own (``bench kv``).

Run as a script, ``python kv_driver.py SPEC.json OUT.json``, it imports ``openlora_ray`` from
whatever the path gives: the current tree, or an extracted copy of the fixed-row engine that the
paged one replaced, so both are driven by exactly the same code. It therefore uses only the
engine API both share (``EngineConfig``, ``Engine``, ``SamplingParams``, ``stats.running``).

SPEC: ``{"engine": {EngineConfig fields}, "adapters": {id: folder}, "sample_period_s": float,
"warmup": [{"prompt": [ids], "adapter": id | null}], "requests": [{"prompt": [ids], "adapter": id |
null, "max_tokens": n, "arrival_s": t}]}``; warm-up requests run one by one before the clock starts.
OUT: per-request times and token counts, the makespan, and the running batch size and queue depth
sampled over time.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any


async def _serve(engine: Any, spec: dict[str, Any], params_cls: Any) -> dict[str, Any]:
    start = time.monotonic()
    in_flight: list[tuple[int, int]] = []  # (running, queued)
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            in_flight.append((engine.stats.running, engine.stats.queue_depth))
            await asyncio.sleep(spec["sample_period_s"])

    async def one(r: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(max(0.0, start + r["arrival_s"] - time.monotonic()))
        arrived = time.monotonic()
        params = params_cls(max_tokens=r["max_tokens"], temperature=0.0, ignore_eos=True)
        first = None
        tokens = 0
        async for out in engine.generate(engine.make_request(r["prompt"], r["adapter"], params)):
            tokens += len(out.token_ids)
            first = first or time.monotonic()
        return {"ttft_s": first - arrived, "tokens": tokens, "end_s": time.monotonic() - start}

    sampler = asyncio.create_task(sample())
    results = await asyncio.gather(*(one(r) for r in spec["requests"]))
    done.set()
    await sampler
    stats = engine.stats
    return {
        "requests": results,
        "makespan_s": max(r["end_s"] for r in results),
        "in_flight": in_flight,
        "preemptions": getattr(stats, "preemptions", 0),
        "prefix_hit_rate": getattr(stats, "prefix_hit_rate", 0.0),
    }


def main(spec_path: str, out_path: str) -> None:
    from openlora_ray.engine.config import EngineConfig
    from openlora_ray.engine.engine import Engine
    from openlora_ray.engine.request import SamplingParams

    spec = json.loads(Path(spec_path).read_text())
    adapters = {k: Path(v) for k, v in spec["adapters"].items()}
    engine = Engine(EngineConfig(**spec["engine"]), adapters.__getitem__ if adapters else None)
    try:
        first = spec["requests"][0]  # every adapter into a slot and the model run once: both start warm
        for adapter in {r["adapter"] for r in spec["requests"]}:
            asyncio.run(_warm(engine, first["prompt"][:8], adapter, SamplingParams))
        for w in spec.get("warmup", []):
            asyncio.run(_warm(engine, w["prompt"], w["adapter"], SamplingParams))
        result = asyncio.run(_serve(engine, spec, SamplingParams))
    finally:
        engine.shutdown(drain_timeout_s=1)
    result["engine_source"] = sys.modules[Engine.__module__].__file__  # which tree was imported
    Path(out_path).write_text(json.dumps(result))


async def _warm(engine: Any, prompt: list[int], adapter: str | None, params_cls: Any) -> None:
    async for _ in engine.generate(engine.make_request(prompt, adapter, params_cls(max_tokens=2, temperature=0.0))):
        pass


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
