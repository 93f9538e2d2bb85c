"""Turning a store's object listing into adapters and their versions, a page at a time.

Keys are ``<name>/<version>/<file>``. A version is visible once its manifest exists; other objects
(half-pushed files, tombstones of deleted versions, strays) are not versions. Object stores list
keys in order, so one adapter's objects arrive together and a listing can stop as soon as it has
the adapters it needs: a page of ``limit`` adapters costs about ``limit`` adapters' worth of
objects, however many adapters the store holds.

Adapters are ordered by key, i.e. by ``name + "/"``: the order S3 lists them in, in which ``a-b``
comes before ``a`` (``-`` sorts before ``/``). A page continues *after* a name, OpenAI-style
(``after=<last name of the previous page>``).

A tenant's listing (``owners``: its own name prefix and the shared one) skips other tenants'
adapters without reading them: names ``owner.x`` sort together, and every key of them sorts
before ``owner/``, so on meeting a foreign owner the listing starts again after ``owner/`` (one
request per foreign tenant met, instead of reading all of its adapters' objects).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

from openlora_ray.errors import OpenLoraError
from openlora_ray.store.backends import ObjectInfo, ObjectStore
from openlora_ray.store.ids import AdapterId, parse_adapter_id, version_sort_key
from openlora_ray.store.manifest import ADAPTER_FILES, MANIFEST_FILE

log = logging.getLogger(__name__)

MAX_PAGE = 1000


@dataclass(frozen=True)
class VersionInfo:
    """One visible version in the store (its manifest has been written)."""

    id: AdapterId  # always pinned
    size: int  # bytes of the adapter files, manifest excluded
    pushed_at: datetime


@dataclass(frozen=True)
class AdapterVersions:
    """One adapter and its visible versions, oldest push first (never empty)."""

    name: str
    versions: tuple[VersionInfo, ...]


@dataclass(frozen=True)
class Page:
    adapters: tuple[AdapterVersions, ...]
    has_more: bool

    @property
    def last(self) -> str | None:
        """The ``after`` that continues the listing (None on an empty page)."""
        return self.adapters[-1].name if self.adapters else None


def start_after(name: str | None) -> str:
    """The object key just past every key of ``name`` (every key ``name/...`` sorts below ``name0``)."""
    return f"{name}0" if name else ""


def group_versions(objects: Iterable[ObjectInfo], where: str) -> Iterator[AdapterVersions]:
    """Adapters with at least one visible version, from a key-ordered object listing (lazily)."""
    name: str | None = None
    files: dict[str, int] = {}
    manifests: dict[str, datetime] = {}

    def flush() -> Iterator[AdapterVersions]:
        versions = []
        for version, pushed in manifests.items():
            try:
                aid = parse_adapter_id(f"{name}@{version}")
            except OpenLoraError:
                log.debug("ignoring %s/%s in %s: not a valid adapter id", name, version, where)
                continue
            versions.append(VersionInfo(aid, files.get(version, 0), pushed))
        if versions:
            versions.sort(key=lambda v: (v.pushed_at, version_sort_key(v.id.version)))
            yield AdapterVersions(versions[0].id.name, tuple(versions))

    for obj in objects:
        parts = obj.key.split("/")
        if len(parts) != 3:
            continue
        if parts[0] != name:
            if name is not None:
                yield from flush()
            name, files, manifests = parts[0], {}, {}
        if parts[2] == MANIFEST_FILE:
            manifests[parts[1]] = obj.last_modified
        elif parts[2] in ADAPTER_FILES:
            files[parts[1]] = files.get(parts[1], 0) + obj.size
    if name is not None:
        yield from flush()


def iter_adapters(
    backend: ObjectStore, after: str | None = None, prefix: str = "", owners: frozenset[str] | None = None
) -> Iterator[AdapterVersions]:
    """Every adapter (whose name starts with ``prefix``) after ``after``, in key order, lazily.

    With ``owners``, only names without a '.' and names whose part before the first '.' is one of
    ``owners`` (the tenancy convention of ``serve.auth``), skipping the others as the module says.
    """
    if owners is None:
        objects = backend.list(prefix, start_after(after))
    else:
        objects = _owned_objects(backend, prefix, start_after(after), owners)
    return group_versions(objects, backend.describe())


def _owned_objects(backend: ObjectStore, prefix: str, start: str, owners: frozenset[str]) -> Iterator[ObjectInfo]:
    while True:
        for obj in backend.list(prefix, start):
            owner, dot, _ = obj.key.split("/", 1)[0].partition(".")
            if dot and owner not in owners:
                start = f"{owner}/"  # past every key of every 'owner.*' name: list again from there
                break
            yield obj
        else:
            return


def page(
    adapters: Iterator[AdapterVersions], limit: int, keep: Callable[[str], bool] | None = None
) -> Page:
    """The first ``limit`` adapters that ``keep`` accepts; ``has_more`` looks one adapter ahead."""
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE}")
    taken: list[AdapterVersions] = []
    for adapter in adapters:
        if keep is not None and not keep(adapter.name):
            continue
        if len(taken) == limit:
            return Page(tuple(taken), has_more=True)
        taken.append(adapter)
    return Page(tuple(taken), has_more=False)
