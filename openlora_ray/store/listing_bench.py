"""``openlora-ray bench listing``: how long listing a store of many adapters takes.

``/v1/models`` and ``openlora-ray adapters ls`` list the store. Before pagination they read every
object of every adapter (three per version) and sorted them; now a page of ``limit`` adapters
reads only as far as it needs (see :mod:`listing`). This benchmark fills a folder store and an S3
store (moto's server on 127.0.0.1, listed over HTTP like MinIO) with ``--adapters`` adapters of
one version each, ten tenants' worth of names, and times, in the same run:

* the full listing (every version: ``adapters ls`` without ``--limit``, and what ``/v1/models``
  did before it paged: the baseline),
* the first page (``/v1/models``'s default ``limit`` and ``adapters ls --limit 100``),
* a page from the middle (``after=`` a name halfway), and
* a page of one tenant's adapters (``/v1/models`` for a tenant's key: other tenants' adapters are
  skipped unread, one listing request per tenant skipped; ``t7`` comes after seven of them).

The S3 objects are put into moto's in-process state directly (30,000 PUTs over HTTP would take
most of the run); every listing goes over HTTP through the store's own code.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from openlora_ray.adapter_format import CONFIG_FILE, WEIGHTS_FILE
from openlora_ray.store.listing import MAX_PAGE
from openlora_ray.store.manifest import MANIFEST_FILE, FileEntry, Manifest

log = logging.getLogger(__name__)

TENANTS = 10
BUCKET = "openlora-bench-listing"
PREFIX = "adapters"


def register_listing_bench(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser("listing", help="listing a store of many adapters: full listing vs pages")
    p.add_argument("--adapters", type=int, default=10_000, help="adapters in the store (default: %(default)s)")
    p.add_argument("--page", type=int, default=100, help="page size of the small pages (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each listing (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("bench-results/listing.json"))
    p.set_defaults(func=run_listing_bench)


def _names(n: int) -> list[str]:
    return [f"t{i % TENANTS}.adapter-{i:05d}" for i in range(n)]


def _objects(name: str) -> dict[str, bytes]:
    """The three objects of one version (small stand-ins: a listing reads keys and sizes only)."""
    files = {CONFIG_FILE: b"{}", WEIGHTS_FILE: b"w" * 64}
    manifest = Manifest(
        name=name, version="v1", created_at=datetime.now(timezone.utc),
        files={f: FileEntry(size=len(data), sha256="0" * 64) for f, data in files.items()},
    )
    return {**files, MANIFEST_FILE: manifest.to_json()}


def _fill_folder(root: Path, names: list[str]) -> None:
    for name in names:
        folder = root / name / "v1"
        folder.mkdir(parents=True)
        for fname, data in _objects(name).items():
            (folder / fname).write_bytes(data)


def _fill_moto(names: list[str]) -> None:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    for name in names:
        for fname, data in _objects(name).items():
            backend.put_object(BUCKET, f"{PREFIX}/{name}/v1/{fname}", data)


def _time(fn: Callable[[], int], repeats: int) -> dict[str, float]:
    fn()  # warm-up (connections, page cache)
    samples, count = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        count = fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": statistics.median(samples), "max_ms": max(samples), "items": count}


def _measure(store, names: list[str], page: int, repeats: int) -> dict[str, dict[str, float]]:
    middle = sorted(n + "/" for n in names)[len(names) // 2][:-1]
    tenant = "t7."
    return {
        "full listing (baseline)": _time(lambda: len(store.list()), repeats),
        f"first page, limit {MAX_PAGE}": _time(lambda: len(store.page(None, MAX_PAGE).adapters), repeats),
        f"first page, limit {page}": _time(lambda: len(store.page(None, page).adapters), repeats),
        f"page after the middle, limit {page}": _time(lambda: len(store.page(middle, page).adapters), repeats),
        f"one tenant's first page, limit {page}": _time(
            lambda: len(store.page(None, page, lambda n: n.startswith(tenant), frozenset({tenant[:-1], "shared"})).adapters),
            repeats),
    }


def run_listing_bench(args: argparse.Namespace) -> int:
    from openlora_ray.bench.timing import cpu_model, print_table, write_json
    from openlora_ray.store.bench import _start_moto
    from openlora_ray.store.settings import StoreSettings
    from openlora_ray.store.store import AdapterStore

    names = _names(args.adapters)
    work = Path(tempfile.mkdtemp(prefix="openlora-bench-listing-"))
    server = None
    results: dict[str, dict[str, dict[str, float]]] = {}
    try:
        t0 = time.perf_counter()
        _fill_folder(work / "store", names)
        log.info("folder store filled in %.1f s", time.perf_counter() - t0)
        folder = AdapterStore(StoreSettings(uri=str(work / "store"), cache_dir=work / "cache"))
        results["folder"] = _measure(folder, names, args.page, args.repeats)

        server, endpoint = _start_moto()
        s3 = AdapterStore(StoreSettings(
            uri=f"s3://{BUCKET}/{PREFIX}", endpoint_url=endpoint, region="us-east-1", addressing_style="path",
            access_key_id="bench", secret_access_key="bench", cache_dir=work / "cache",
        ))
        s3.backend.client.create_bucket(Bucket=BUCKET)
        t0 = time.perf_counter()
        _fill_moto(names)
        log.info("moto store filled in %.1f s", time.perf_counter() - t0)
        results["moto S3"] = _measure(s3, names, args.page, args.repeats)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    cpu = cpu_model()
    print(f"{args.adapters} adapters (1 version, 3 objects each), {TENANTS} tenants; {args.repeats} runs each; CPU: {cpu}")
    rows = []
    for backend, measured in results.items():
        baseline = measured["full listing (baseline)"]["median_ms"]
        for what, m in measured.items():
            rows.append([backend, what, m["items"], m["median_ms"], m["max_ms"], baseline / m["median_ms"]])
    print_table(["store", "listing", "items", "median ms", "max ms", "x faster than full"], rows)
    write_json(args.out, {"benchmark": "listing", "adapters": args.adapters, "page": args.page,
                          "repeats": args.repeats, "cpu": cpu, "results": results})
    print(f"wrote {args.out}")
    return 0
