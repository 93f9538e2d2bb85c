"""AdapterStore against the real S3-protocol server: round trips, versions, stat, delete."""

from __future__ import annotations

import asyncio
import json

import pytest
from store_helpers import TINY_LLAMA_DIMS, WEIGHTS, settings_for

from openlora_ray.adapter_format import CONFIG_FILE
from openlora_ray.errors import AdapterNotFoundError, InvalidAdapterError, InvalidAdapterIdError
from openlora_ray.store import MANIFEST_FILE, AdapterStore, AdapterVersionExistsError
from openlora_ray.store.manifest import TOMBSTONE_FILE


def test_push_then_fetch_is_byte_identical(make_store, adapters, s3, s3_client):
    store = make_store()
    manifest = store.push(adapters[0], "sql@v1")
    assert set(manifest.files) == {CONFIG_FILE, WEIGHTS}
    keys = sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=s3.bucket)["Contents"])
    assert keys == [f"adapters/sql/v1/{f}" for f in sorted([CONFIG_FILE, WEIGHTS, MANIFEST_FILE])]

    local = store.fetch("sql@v1")
    assert str(local.id) == "sql@v1"
    for f in (CONFIG_FILE, WEIGHTS):
        assert (local.path / f).read_bytes() == (adapters[0] / f).read_bytes()
    assert local.spec.rank == 4 and len(local.spec.targets) == 2 * 7
    assert store.resolve("sql@v1") == local.path


def test_push_validates_against_base_model_dims(make_store, adapters):
    store = make_store()
    store.dims = TINY_LLAMA_DIMS
    store.push(adapters[0], "fits@v1")
    assert store.fetch("fits@v1").spec.rank == 4
    store.max_rank = 2
    with pytest.raises(InvalidAdapterError, match="rank 4 exceeds"):
        store.push(adapters[0], "toobig@v1")
    with pytest.raises(InvalidAdapterError, match="rank 4 exceeds"):
        store.fetch("fits@v1")  # also refused from the cache: validation runs on every resolve


def test_name_alone_means_newest_version(make_store, adapters):
    store = make_store()
    store.push(adapters[0], "chat@v1")
    store.push(adapters[1], "chat@v2")
    assert str(store.pin("chat")) == "chat@v2"
    assert (store.resolve("chat") / WEIGHTS).read_bytes() == (adapters[1] / WEIGHTS).read_bytes()
    store.push(adapters[2], "chat@a-older-name-newer-push")  # push order wins, not the name
    assert str(store.pin("chat")) == "chat@a-older-name-newer-push"
    assert {v.id.version for v in store.list("chat")} == {"v1", "v2", "a-older-name-newer-push"}


def test_push_without_version_uses_sortable_timestamp(make_store, adapters):
    store = make_store()
    m1 = store.push(adapters[0], "auto")
    m2 = store.push(adapters[1], "auto")
    assert m1.version < m2.version and len(m1.version) == len("20250131-235959-123456")
    assert store.pin("auto").version == m2.version


def test_versions_are_immutable(make_store, adapters):
    store = make_store()
    store.push(adapters[0], "fixed@v1")
    with pytest.raises(AdapterVersionExistsError, match="immutable"):
        store.push(adapters[1], "fixed@v1")
    assert (store.resolve("fixed@v1") / WEIGHTS).read_bytes() == (adapters[0] / WEIGHTS).read_bytes()


def test_stat_and_read_config_do_not_download_weights(make_store, adapters, s3):
    store = make_store()
    store.push(adapters[0], "st@v1")
    s3.log.clear()
    manifest = store.stat("st")
    assert manifest.version == "v1" and manifest.total_bytes > 0
    assert json.loads(store.read_config("st@v1"))["r"] == 4
    assert s3.count("GET", WEIGHTS) == 0


def test_missing_adapter_and_version(make_store, adapters):
    store = make_store()
    with pytest.raises(AdapterNotFoundError, match="'nope'"):
        store.resolve("nope")
    store.push(adapters[0], "one@v1")
    with pytest.raises(AdapterNotFoundError, match="one@v2"):
        store.resolve("one@v2")


def test_delete_removes_version_everywhere(make_store, adapters, s3, s3_client):
    store = make_store()
    store.push(adapters[0], "gone@v1")
    store.push(adapters[1], "gone@v2")
    path = store.resolve("gone@v2")
    store.delete("gone@v2")
    assert not path.exists()
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=s3.bucket)["Contents"]]
    assert [k for k in keys if "/v2/" in k] == [f"adapters/gone/v2/{TOMBSTONE_FILE}"]  # only the tombstone
    assert str(store.pin("gone")) == "gone@v1"
    assert [str(v.id) for v in store.list()] == ["gone@v1"]
    with pytest.raises(AdapterNotFoundError):
        store.delete("gone@v2")
    with pytest.raises(InvalidAdapterIdError, match="without a version"):
        store.delete("gone")


def test_half_pushed_version_is_invisible(make_store, adapters, s3, s3_client):
    """Files without a manifest (a push that died) are neither listed nor resolved."""
    store = make_store()
    s3_client.put_object(Bucket=s3.bucket, Key="adapters/half/v1/" + WEIGHTS, Body=b"x")
    assert store.list() == []
    with pytest.raises(AdapterNotFoundError):
        store.resolve("half@v1")
    store.push(adapters[0], "half@v1")  # a later push of that version succeeds
    assert store.resolve("half@v1").is_dir()


async def test_aresolve_runs_off_the_event_loop(make_store, adapters):
    store = make_store()
    store.push(adapters[0], "aio@v1")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    t = asyncio.create_task(ticker())
    paths = await asyncio.gather(store.aresolve("aio@v1"), store.aresolve("aio"))
    t.cancel()
    assert paths[0] == paths[1] and ticks > 0
    assert (await store.afetch("aio@v1")).id.version == "v1"


def test_local_folder_store_round_trip(tmp_path, adapters):
    for uri in (str(tmp_path / "store"), f"file://{tmp_path / 'store'}"):
        (tmp_path / "store").mkdir(exist_ok=True)
        store = AdapterStore(settings_for(uri, tmp_path / f"cache-{len(uri)}"))
        if not store.list():
            store.push(adapters[0], "loc@v1")
            store.push(adapters[1], "loc@v2")
        assert [str(v.id) for v in store.list()] == ["loc@v1", "loc@v2"]
        assert (tmp_path / "store/loc/v1" / MANIFEST_FILE).is_file()
        assert (store.resolve("loc") / WEIGHTS).read_bytes() == (adapters[1] / WEIGHTS).read_bytes()
        assert (store.resolve("loc@v1") / WEIGHTS).read_bytes() == (adapters[0] / WEIGHTS).read_bytes()
    with pytest.raises(AdapterVersionExistsError):
        store.push(adapters[0], "loc@v1")
    store.delete("loc@v1")
    assert [p.name for p in (tmp_path / "store/loc/v1").iterdir()] == [TOMBSTONE_FILE]
    assert [str(v.id) for v in store.list()] == ["loc@v2"]


def test_progress_reports_every_byte(make_store, adapters):
    store = make_store()
    seen: dict[str, list[int]] = {}

    def factory(desc: str, total: int):
        seen[desc] = [total, 0]
        return lambda n: seen[desc].__setitem__(1, seen[desc][1] + n)

    manifest = store.push(adapters[0], "prog@v1", progress=factory)
    store.fetch("prog@v1", progress=factory)
    assert len(seen) == 2 and all(total == done > 0 for total, done in seen.values())
    assert sum(t for t, _ in seen.values()) == manifest.total_bytes


def test_base_model_mismatch_is_logged_not_refused(make_store, adapter_copy, caplog):
    cfg = json.loads((adapter_copy / CONFIG_FILE).read_text())
    cfg["base_model_name_or_path"] = "someone/tiny-llama"
    (adapter_copy / CONFIG_FILE).write_text(json.dumps(cfg))
    store = make_store()
    store.push(adapter_copy, "bm@v1")
    store.base_model_name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with caplog.at_level("WARNING", logger="openlora_ray.store.store"):
        assert store.resolve("bm@v1").is_dir()
    assert "serving it because its shapes fit" in caplog.text
