"""A replica's engine over a real folder store (no Ray): the store profile check at start, and
tiers keyed by content, so a version whose store objects were replaced never serves old weights."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path

import pytest

from openlora_ray.engine.config import EngineConfig, EngineSettings
from openlora_ray.engine.engine import Engine
from openlora_ray.engine.request import SamplingParams
from openlora_ray.serve.engine_wiring import build_engine, open_store
from openlora_ray.store.manifest import MANIFEST_FILE, build_manifest
from openlora_ray.store.profile import StoreProfile, StoreProfileError
from openlora_ray.store.settings import StoreSettings
from openlora_ray.store.store import AdapterStore

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PROMPT = [5, 17, 42, 9, 33, 7]


def _settings(root: Path, cache: Path, ttl: float = 60.0) -> StoreSettings:
    return StoreSettings(uri=str(root), cache_dir=cache, latest_ttl_s=ttl)


async def _answer(engine, adapter: str) -> list[int]:
    out: list[int] = []
    async for item in engine.generate(engine.make_request(PROMPT, adapter, GREEDY)):
        out += item.token_ids
    return out


def _replace_by_hand(store_root: Path, name: str, version: str, src: Path) -> None:
    """What an operator copying objects into the bucket does: files and manifest, no push."""
    folder = store_root / name / version
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(src / f, folder / f)
    (folder / MANIFEST_FILE).write_bytes(build_manifest(name, version, src).to_json())


def test_replica_refuses_a_store_recorded_for_another_model(tiny_model_dir, tmp_path):
    store_root = tmp_path / "store"
    store_root.mkdir()
    other = tmp_path / "other-model"
    other.mkdir()
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "hidden_size": cfg["hidden_size"] * 2, "_name_or_path": "big-llama"}))
    AdapterStore(_settings(store_root, tmp_path / "c0")).init(StoreProfile.from_model_dir(other, max_rank=8))
    with pytest.raises(StoreProfileError, match=r"cannot serve.*big-llama.*hidden_size \d+ \(this model: \d+\)"):
        open_store(_settings(store_root, tmp_path / "c1"), tiny_model_dir, max_rank=8)


def test_replica_refuses_slots_smaller_than_the_store_max_rank_and_accepts_a_match(tiny_model_dir, tmp_path):
    store_root = tmp_path / "store"
    store_root.mkdir()
    AdapterStore(_settings(store_root, tmp_path / "c0")).init(StoreProfile.from_model_dir(tiny_model_dir, max_rank=32))
    with pytest.raises(StoreProfileError, match="up to rank 32.*rank 16 at most: set engine.max_rank to 32"):
        open_store(_settings(store_root, tmp_path / "c1"), tiny_model_dir, max_rank=16)
    assert open_store(_settings(store_root, tmp_path / "c2"), tiny_model_dir, max_rank=32).profile().max_rank == 32
    assert open_store(_settings(store_root, tmp_path / "c3"), tiny_model_dir, max_rank=64) is not None


def test_replica_warns_and_serves_a_store_without_a_profile(tiny_model_dir, tmp_path, caplog):
    (tmp_path / "store").mkdir()
    with caplog.at_level(logging.WARNING, logger="openlora_ray.serve.engine_wiring"):
        store = open_store(_settings(tmp_path / "store", tmp_path / "c"), tiny_model_dir, max_rank=8)
    assert store.profile() is None
    assert "records no base model" in caplog.text and "adapters init --base-model DIR --max-rank 8" in caplog.text


def test_lora_replica_stops_at_start_on_a_profile_mismatch(tiny_model_dir, tmp_path):
    """The deployment class itself (constructed outside Serve: it fails before it asks Serve anything)."""
    from openlora_ray.serve.replica import LoraReplica

    store_root = tmp_path / "store"
    store_root.mkdir()
    AdapterStore(_settings(store_root, tmp_path / "c0")).init(StoreProfile.from_model_dir(tiny_model_dir, max_rank=64))
    config = {
        "model": str(tiny_model_dir),
        "engine": {"num_slots": 2, "max_rank": 8, "max_seq_len": 64},
        "store": {"uri": str(store_root), "cache_dir": str(tmp_path / "c1")},
        "auth": {"enabled": False},
    }
    with pytest.raises(StoreProfileError, match="set engine.max_rank to 64"):
        LoraReplica(config)


async def test_replaced_store_objects_are_never_served_from_a_slot_or_the_host_tier(tiny_model_dir, make_adapter, tmp_path):
    v1, v2, v3 = (make_adapter(f"dg-v{i}", r=4, alpha=8.0, seed=80 + i) for i in (1, 2, 3))
    other = make_adapter("dg-other", r=2, alpha=4.0, seed=84)
    store_root = tmp_path / "store"
    store_root.mkdir()
    store = open_store(_settings(store_root, tmp_path / "cache", ttl=0.05), tiny_model_dir, max_rank=8)
    store.push(v1, "bot@v1")
    store.push(other, "other@v1")
    engine, resolver = build_engine(
        EngineSettings(num_slots=1, max_rank=8, max_seq_len=64, adapter_recheck_s=0.05), tiny_model_dir, store
    )
    # Reference answers: an engine over the bare folders.
    folders = Engine(EngineConfig(model_path=tiny_model_dir, num_slots=3, max_rank=8, max_seq_len=64),
                     {"v1": v1, "v2": v2, "v3": v3}.__getitem__)
    try:
        want = {v: await _answer(folders, v) for v in ("v1", "v2", "v3")}
        assert len({tuple(w) for w in want.values()}) == 3
        assert await _answer(engine, "bot@v1") == want["v1"]

        # (a) bot@v1 sits in the only slot when its store objects are replaced by hand.
        _replace_by_hand(store_root, "bot", "v1", v2)
        await asyncio.sleep(0.1)  # past the store's and the engine's recheck intervals
        assert await _answer(engine, "bot@v1") == want["v2"]
        assert resolver.fetches["store"] == 2  # the replaced content was fetched again

        # (b) another adapter pushes bot@v1 out: the host tier holds both old contents under that id.
        await _answer(engine, "other@v1")
        assert engine.stats.host_adapters == ("bot@v1", "bot@v1")
        _replace_by_hand(store_root, "bot", "v1", v3)
        await asyncio.sleep(0.1)
        assert await _answer(engine, "bot@v1") == want["v3"]
        assert engine.slots.loads_by_tier["host"] == 0  # neither old host copy was used
    finally:
        engine.shutdown(drain_timeout_s=1)
        folders.shutdown(drain_timeout_s=1)
