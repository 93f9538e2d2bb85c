"""The node-local disk cache: offline hits, LRU eviction by bytes, one download per node."""

from __future__ import annotations

import multiprocessing as mp
import os
import threading

import pytest
from store_helpers import WEIGHTS, RecordingMotoServer, cache_files, resolve_in_process, settings_for

from openlora_ray.errors import StoreUnavailableError
from openlora_ray.store import AdapterStore
from openlora_ray.store.cache import DiskCache


def test_cached_version_is_served_without_the_store(s3, adapters, tmp_path):
    """Stop the server: a pinned, cached version still resolves (in a fresh store instance too)."""
    own = RecordingMotoServer()
    own.start()
    try:
        settings = settings_for(f"s3://{s3.bucket}/a", tmp_path / "cache", own.endpoint, max_attempts=1)
        store = AdapterStore(settings)
        store.push(adapters[0], "off@v1")
        path = store.resolve("off@v1")
    finally:
        own.stop()
    assert store.resolve("off@v1") == path
    assert AdapterStore(settings).resolve("off@v1") == path
    with pytest.raises(StoreUnavailableError, match=own.endpoint):
        store.resolve("off")  # "newest" needs the store
    assert own.count("GET", WEIGHTS) == 1


def test_eviction_is_lru_by_bytes(make_store, adapters, tmp_path):
    probe = make_store(cache_dir=tmp_path / "probe")
    for i, a in enumerate(adapters):
        probe.push(a, f"e{i}@v1")
    entry = sum(f.stat().st_size for f in probe.resolve("e0@v1").iterdir())

    store = make_store(cache_bytes=int(entry * 2.5), max_adapter_bytes=entry)
    p0, p1 = store.resolve("e0@v1"), store.resolve("e1@v1")
    store.resolve("e0@v1")  # e0 is now more recently used than e1
    p2 = store.resolve("e2@v1")
    assert p0.exists() and p2.exists() and not p1.exists()
    assert store.cache.size_bytes() <= int(entry * 2.5)
    assert [e.key.rsplit("/", 2)[1] for e in store.cache.entries()] == ["e0", "e2"]
    store.resolve("e1@v1")  # fetched again, evicting e0 (least recently used now)
    assert not p0.exists() and p1.exists() and p2.exists()


def test_recently_used_entries_survive_eviction(make_store, adapters):
    probe = make_store()
    probe.push(adapters[0], "g0@v1")
    probe.push(adapters[1], "g1@v1")
    entry = sum(f.stat().st_size for f in probe.resolve("g0@v1").iterdir())
    store = make_store(cache_bytes=entry, max_adapter_bytes=entry, evict_grace_s=60)
    store.resolve("g0@v1")
    p1 = store.resolve("g1@v1")
    assert p1.exists() and store.resolve("g0@v1").exists()  # over budget, but nothing is idle yet


def test_concurrent_fetches_in_threads_download_once(make_store, adapters, s3, tmp_path):
    make_store(cache_dir=tmp_path / "pusher").push(adapters[0], "thr@v1")
    store = make_store()
    s3.log.clear()
    n = 8
    barrier = threading.Barrier(n)
    paths, errors = [], []

    def worker() -> None:
        barrier.wait()
        try:
            paths.append(store.resolve("thr@v1"))
        except Exception as e:  # collected and asserted on below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1 and len(paths) == n
    assert s3.count("GET", WEIGHTS) == 1


def test_concurrent_fetches_in_processes_download_once(make_store, adapters, s3, tmp_path):
    store = make_store(cache_dir=tmp_path / "pusher")
    store.push(adapters[1], "proc@v1")
    settings = settings_for(f"s3://{s3.bucket}/adapters", tmp_path / "shared", s3.endpoint)
    s3.log.clear()
    ctx = mp.get_context("spawn")
    n = 3
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=resolve_in_process, args=(settings.model_dump_json(), "proc@v1", barrier, results))
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    paths = {results.get(timeout=60) for _ in range(n)}
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len(paths) == 1
    assert s3.count("GET", WEIGHTS) == 1


def test_damaged_cache_entry_is_fetched_again(make_store, adapters, s3):
    store = make_store()
    store.push(adapters[0], "dmg@v1")
    path = store.resolve("dmg@v1")
    (path / WEIGHTS).write_bytes(b"short")
    assert (store.resolve("dmg@v1") / WEIGHTS).read_bytes() == (adapters[0] / WEIGHTS).read_bytes()
    assert s3.count("GET", WEIGHTS) == 2


def test_failed_populate_leaves_nothing(tmp_path):
    cache = DiskCache(tmp_path / "c", budget_bytes=1 << 20)

    def boom(tmp):
        (tmp / "half").write_bytes(b"x" * 100)
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        cache.get_or_create("s/n/v", boom)
    assert cache_files(tmp_path / "c") == [] and cache.lookup("s/n/v") is None
    path, result = cache.get_or_create("s/n/v", lambda tmp: (tmp / "f").write_bytes(b"ok"))
    assert (path / "f").read_bytes() == b"ok" and result == 2
    assert cache.get_or_create("s/n/v", lambda tmp: 1 / 0) == (path, None)


def test_stale_temp_folders_are_cleaned(tmp_path):
    stale = tmp_path / "c" / ".tmp" / "999-dead"
    stale.mkdir(parents=True)
    os.utime(stale, (0, 0))
    DiskCache(tmp_path / "c", budget_bytes=1)
    assert not stale.exists()
