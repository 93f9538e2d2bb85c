"""Listing a store with many adapters, through the store's API (pagination included)."""

from __future__ import annotations

from datetime import datetime, timezone

from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends
from store_helpers import WEIGHTS

from openlora_ray.store import MANIFEST_FILE
from openlora_ray.store.manifest import FileEntry, Manifest

N_NAMES, N_VERSIONS = 550, 2  # 1,100 versions, 2,200 objects: three ListObjectsV2 pages


def test_listing_many_adapters(make_store, s3, s3_client):
    # The objects are put straight into the (in-process) server's state: 2,200 PUTs over HTTP
    # would take most of this test's time. The listing goes over HTTP through AdapterStore.list.
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]

    def put(i: int) -> None:
        name, version = f"adapter-{i // N_VERSIONS:04d}", f"v{i % N_VERSIONS}"
        files = {f: FileEntry(size=i, sha256="0" * 64) for f in ("adapter_config.json", WEIGHTS)}
        m = Manifest(name=name, version=version, created_at=datetime.now(timezone.utc), files=files)
        base = f"adapters/{name}/{version}/"
        backend.put_object(s3.bucket, base + WEIGHTS, b"w" * i)
        backend.put_object(s3.bucket, base + MANIFEST_FILE, m.to_json())

    for i in range(N_NAMES * N_VERSIONS):
        put(i)
    # Stray objects that are not versions are ignored.
    s3_client.put_object(Bucket=s3.bucket, Key="adapters/README.txt", Body=b"x")
    s3_client.put_object(Bucket=s3.bucket, Key=f"adapters/Bad Name/v1/{MANIFEST_FILE}", Body=b"{}")

    store = make_store()
    s3.log.clear()
    versions = store.list()
    assert len(versions) == N_NAMES * N_VERSIONS
    assert sum(1 for m, p in s3.log if m == "GET" and p.rstrip("/").endswith(s3.bucket)) >= 3  # paginated
    names = [v.id.name for v in versions]
    assert names == sorted(names) and len(set(names)) == N_NAMES
    sizes = {str(v.id): v.size for v in versions}
    assert sizes["adapter-0123@v1"] == 123 * 2 + 1
    assert [str(v.id) for v in store.list("adapter-0042")] == ["adapter-0042@v0", "adapter-0042@v1"]
    assert store.list("adapter-9999") == []


def _pages(store, limit: int, keep=None) -> list[list[str]]:
    pages, after = [], None
    while True:
        page = store.page(after, limit, keep)
        pages.append([a.name for a in page.adapters])
        if not page.has_more:
            return pages
        after = page.last


def test_pages_follow_after_and_read_only_what_they_need(make_store, s3, adapters, tmp_path):
    """Both backends page in the same (key) order: 'a-b' before 'a', since '-' sorts before '/'."""
    from openlora_ray.store import AdapterStore
    from store_helpers import settings_for

    (tmp_path / "folder").mkdir()
    stores = [make_store(), AdapterStore(settings_for(str(tmp_path / "folder"), tmp_path / "fcache"))]
    names = ["a", "a-b", "a.c", "b", "b0", "c"]
    for store in stores:
        for name in names:
            store.push(adapters[0], f"{name}@v1")
        store.push(adapters[1], "b@v2")
        store.push(adapters[0], "gone@v1")
        store.delete("gone@v1")  # a tombstone only: not an adapter
    for store in stores:
        assert _pages(store, 4) == [["a-b", "a.c", "a", "b"], ["b0", "c"]]
        assert _pages(store, 2, keep=lambda n: n.startswith("b")) == [["b", "b0"]]
        assert [str(v.id) for v in store.page("a", 1).adapters[0].versions] == ["b@v1", "b@v2"]
        assert store.page("c", 5).adapters == () and not store.page("c", 5).has_more
    s3.log.clear()
    stores[0].page(None, 2)
    assert sum(1 for m, p in s3.log if m == "GET" and p.rstrip("/").endswith(s3.bucket)) == 1  # one ListObjectsV2


def test_a_tenants_page_skips_other_tenants_adapters_unread(make_store, s3, adapters):
    store = make_store()
    names = [f"{owner}.a{i}" for owner in ("acme", "globex", "initech", "shared") for i in range(3)] + ["plain", "zed"]
    for name in names:
        store.push(adapters[0], f"{name}@v1")
    owners = frozenset({"globex", "shared"})
    seen = [a.name for a in store.adapters(owners=owners)]
    assert seen == sorted((n for n in names if n.split(".")[0] in owners or "." not in n), key=lambda n: n + "/")
    assert [a.name for a in store.page("globex.a2", 3, owners=owners).adapters] == ["plain", "shared.a0", "shared.a1"]
    s3.log.clear()
    assert [a.name for a in store.page(None, 1, owners=frozenset({"initech"})).adapters] == ["initech.a0"]
    listings = [p for m, p in s3.log if m == "GET" and p.rstrip("/").endswith(s3.bucket)]
    assert len(listings) == 3  # from the start, after 'acme/', after 'globex/': acme's and globex's objects skipped
