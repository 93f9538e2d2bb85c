"""The adapter store facade: what the engine, the Serve layer and the CLI call.

``AdapterStore.resolve("name[@version]")`` returns a local folder holding a complete, sha256-checked
and validated PEFT adapter, downloading it into the node-local cache on first use and serving it
from disk afterwards without touching the store. ``aresolve`` does the same from an event loop by
running the blocking work in a worker thread.

Versions are immutable and a pinned ``name@version`` already in the cache is served even when the
store is down; a bare ``name`` means the newest version, which needs one listing of the store
(remembered for ``latest_ttl_s``). "Newest" is the most recently pushed version: the one whose
manifest was written last (ties within the store's timestamp resolution are broken by the manifest's
own creation time, then by natural version order). Deleting a version removes it from the store and
this node's cache and leaves a tombstone: that version string can never be pushed again, so no
cache tier anywhere can hold other weights under it. A node's disk cache also compares its copy's
content digest with the store's manifest (at most once per ``latest_ttl_s``) before serving it,
so a version whose objects were replaced by hand is fetched again rather than served stale.

A store may record the base model it serves and the deployment's ``max_rank``
(:mod:`openlora_ray.store.profile`); a push is then checked against them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from openlora_ray.adapter_format import (
    AdapterSpec,
    BaseModelDims,
    check_finite,
    validate_adapter_dir,
)
from openlora_ray.errors import (
    AdapterNotFoundError,
    InvalidAdapterError,
    InvalidAdapterIdError,
    OpenLoraError,
    StoreUnavailableError,
)
from openlora_ray.store.backends import LocalObjectStore, ObjectExists, ObjectMissing, ObjectStore, Progress
from openlora_ray.store.cache import DiskCache
from openlora_ray.store.ids import AdapterId, new_version, parse_adapter_id, version_sort_key
from openlora_ray.store.listing import AdapterVersions, Page, VersionInfo, iter_adapters, page
from openlora_ray.store.manifest import (
    ADAPTER_FILES,
    MANIFEST_FILE,
    TOMBSTONE_FILE,
    Manifest,
    Tombstone,
    build_manifest,
    verify_files,
)
from openlora_ray.store.profile import PROFILE_FILE, StoreProfile, StoreProfileError, combine_max_rank
from openlora_ray.store.settings import StoreSettings
from openlora_ray.store.uri import LocalRoot, S3Root, StoreRoot, parse_store_uri

log = logging.getLogger(__name__)

ProgressFactory = Callable[[str, int], Progress]
"""``factory(description, total_bytes)`` returns the per-chunk callback of one transfer."""


# After the store failed to answer a digest check, cached copies are served unchecked this long,
# so an outage costs one timeout, not one per disk-cache hit.
VERIFY_BACKOFF_S = 30.0


class AdapterVersionExistsError(OpenLoraError):
    """A push named a version that exists or existed; versions are immutable. HTTP 409."""


@dataclass(frozen=True)
class LocalAdapter:
    """A resolved adapter: pinned id, validated local folder, its manifest and parsed spec."""

    id: AdapterId
    path: Path
    manifest: Manifest
    spec: AdapterSpec
    downloaded: bool = False  # True when this call fetched it from the store (a cache miss)


class AdapterStore:
    """Adapters under one store root, fetched through a node-local disk cache.

    ``dims`` and ``max_rank`` are the serving base model's shapes and slot rank: adapters that do
    not fit are refused at fetch (and push) time with a message naming what is wrong, before any
    byte reaches a device. ``base_model_name`` (e.g. ``HuggingFaceTB/SmolLM2-135M-Instruct``) is
    compared with each adapter's ``base_model_name_or_path`` and a mismatch is logged, not refused:
    that field is often a local path or a sibling checkpoint, and the shape check is what decides.
    Thread-safe; share one instance per process.
    """

    def __init__(
        self,
        settings: StoreSettings,
        *,
        dims: BaseModelDims | None = None,
        max_rank: int | None = None,
        base_model_name: str | None = None,
        backend: ObjectStore | None = None,
        cache: DiskCache | None = None,
    ) -> None:
        self.settings = settings
        self.root: StoreRoot = parse_store_uri(settings.uri)
        self.dims = dims
        self.max_rank = max_rank
        self.base_model_name = base_model_name
        self.backend = backend if backend is not None else _make_backend(self.root, settings)
        self.cache = cache or DiskCache(
            settings.resolved_cache_dir, settings.cache_bytes, evict_grace_s=settings.evict_grace_s
        )
        self._cache_ns = _namespace(self.root, settings)
        self._latest: dict[str, tuple[AdapterId, float]] = {}
        self._latest_lock = threading.Lock()
        self._verified: dict[AdapterId, float] = {}  # cached copy matched the store's manifest until
        self._unverifiable_until = 0.0

    @classmethod
    def from_uri(cls, uri: str, **settings) -> "AdapterStore":
        return cls(StoreSettings(uri=uri, **settings))

    def __repr__(self) -> str:
        return f"AdapterStore({self.backend.describe()}, cache={self.cache.root})"

    # --- listing ---------------------------------------------------------------------------
    def list(self, name: str | None = None) -> list[VersionInfo]:
        """Every visible version (of ``name``, or of all adapters), by name then push order."""
        prefix = f"{parse_adapter_id(name).name}/" if name is not None else ""
        return [v for a in iter_adapters(self.backend, prefix=prefix) for v in a.versions]

    def adapters(self, after: str | None = None, owners: frozenset[str] | None = None) -> Iterator[AdapterVersions]:
        """Adapters after ``after`` in key order (see :mod:`listing`), read from the store lazily;
        with ``owners``, only undotted names and those of these owners (a tenant's view)."""
        # A name from a client: checked before it reaches the store.
        return iter_adapters(self.backend, after=parse_adapter_id(after).name if after else None, owners=owners)

    def page(
        self,
        after: str | None = None,
        limit: int = 100,
        keep: Callable[[str], bool] | None = None,
        owners: frozenset[str] | None = None,
    ) -> Page:
        """One page of adapters (those ``keep`` accepts), reading only as much of the store as it needs."""
        return page(self.adapters(after, owners), limit, keep)

    def latest(self, name: str) -> AdapterId:
        """The newest version of ``name`` (asks the store; see the module docstring)."""
        aid = parse_adapter_id(name)
        versions = self.list(aid.name)
        if not versions:
            raise AdapterNotFoundError(aid.name, self.backend.describe())
        newest = versions[-1].pushed_at.replace(microsecond=0)
        tied = [v for v in versions if v.pushed_at.replace(microsecond=0) >= newest]
        if len(tied) == 1:
            return tied[0].id
        # Store timestamps have one-second resolution: ask the manifests which came last.
        def created(v: VersionInfo) -> tuple:
            return (self._read_manifest(v.id).created_at, version_sort_key(v.id.version))

        return max(tied, key=created).id

    def pin(self, adapter_id: str | AdapterId) -> AdapterId:
        """``name@version`` for an id; a bare name becomes its newest version (memoized briefly)."""
        aid = parse_adapter_id(adapter_id)
        if aid.pinned:
            return aid
        now = time.monotonic()
        with self._latest_lock:
            memo = self._latest.get(aid.name)
        if memo is not None and memo[1] > now:
            return memo[0]
        pinned = self.latest(aid.name)
        with self._latest_lock:
            self._latest[aid.name] = (pinned, now + self.settings.latest_ttl_s)
        return pinned

    # --- the store's profile ---------------------------------------------------------------
    def profile(self) -> StoreProfile | None:
        """The base model and max rank this store serves, if recorded (see :mod:`profile`)."""
        try:
            return StoreProfile.parse(self.backend.read_bytes(PROFILE_FILE))
        except ObjectMissing:
            return None

    def init(self, profile: StoreProfile, replace: bool = False) -> None:
        """Record the store's profile; refuses to change an existing one unless ``replace``.

        Changing the base model of a store whose adapters were checked against another one is
        rarely right, so it takes an explicit ``replace``; the adapters already there are not
        re-checked (the replicas still check each one at load).
        """
        try:
            self.backend.write_bytes(PROFILE_FILE, profile.to_json(), if_absent=not replace)
        except ObjectExists as e:
            current = self.profile()
            if current == profile:
                return
            raise StoreProfileError(
                f"this store already serves {current.describe() if current else 'another profile'}; "
                "pass replace (--replace) to record a different one"
            ) from e
        log.info("store %s now serves %s", self.backend.describe(), profile.describe())

    def _push_limits(self) -> tuple[BaseModelDims | None, int | None]:
        """The dims and max rank a push is checked against: this store object's and the recorded ones."""
        recorded = self.profile()
        if recorded is None:
            return self.dims, self.max_rank
        if self.dims is not None and self.dims != recorded.dims:
            raise StoreProfileError(
                f"the base model given ({self.dims}) is not the one this store serves: {recorded.describe()}"
            )
        return recorded.dims, combine_max_rank(self.max_rank, recorded.max_rank)

    def _forget_latest(self, name: str) -> None:
        with self._latest_lock:
            self._latest.pop(name, None)

    def _read_manifest(self, aid: AdapterId) -> Manifest:
        try:
            data = self.backend.read_bytes(f"{aid.name}/{aid.version}/{MANIFEST_FILE}")
        except ObjectMissing as e:
            raise AdapterNotFoundError(str(aid), self.backend.describe()) from e
        manifest = Manifest.parse(str(aid), data)
        if (manifest.name, manifest.version) != (aid.name, aid.version):
            raise InvalidAdapterError(
                str(aid), f"{MANIFEST_FILE} is for {manifest.name}@{manifest.version} (object copied by hand?)"
            )
        return manifest

    def stat(self, adapter_id: str | AdapterId) -> Manifest:
        """The manifest of a version (newest for a bare name), read from the store."""
        return self._read_manifest(self.pin(adapter_id))

    def read_config(self, adapter_id: str | AdapterId) -> bytes:
        """The raw ``adapter_config.json`` of a version, without downloading the weights."""
        aid = self.pin(adapter_id)
        try:
            return self.backend.read_bytes(f"{aid.name}/{aid.version}/{ADAPTER_FILES[0]}")
        except ObjectMissing as e:
            raise AdapterNotFoundError(str(aid), self.backend.describe()) from e

    # --- fetching --------------------------------------------------------------------------
    def fetch(self, adapter_id: str | AdapterId, progress: ProgressFactory | None = None) -> LocalAdapter:
        """Make a version available on local disk, checked and validated; see :meth:`resolve`."""
        aid = self.pin(adapter_id)
        key = f"{self._cache_ns}/{aid.name}/{aid.version}"
        path = self.cache.lookup(key)
        if path is not None:
            local = self._open_cached(aid, key, path)
            if local is not None and self._matches_store(local, key):
                return local
        path, built = self.cache.get_or_create(key, lambda tmp: self._download(aid, tmp, progress))
        if built is not None:
            return LocalAdapter(aid, path, *built, downloaded=True)
        # Another thread or process built it while we waited for the lock.
        local = self._open_cached(aid, key, path)
        if local is None:
            raise InvalidAdapterError(str(aid), f"cached copy at {path} was damaged while being fetched")
        return local

    def cached_ids(self) -> list[str]:
        """Pinned ids of this store's versions on local disk (the replica reports them to the router)."""
        prefix = f"{self._cache_ns}/"
        return sorted(
            f"{name}@{version}"
            for name, version in (e.key[len(prefix) :].split("/", 1) for e in self.cache.entries() if e.key.startswith(prefix))
        )

    def resolve(self, adapter_id: str | AdapterId) -> Path:
        """Local folder of a validated adapter (blocking: downloads on a cache miss)."""
        return self.fetch(adapter_id).path

    async def afetch(self, adapter_id: str | AdapterId) -> LocalAdapter:
        """:meth:`fetch` in a worker thread, so an event loop is never blocked by I/O."""
        return await asyncio.to_thread(self.fetch, adapter_id)

    async def aresolve(self, adapter_id: str | AdapterId) -> Path:
        """:meth:`resolve` in a worker thread, so an event loop is never blocked by I/O."""
        return (await self.afetch(adapter_id)).path

    def _open_cached(self, aid: AdapterId, key: str, path: Path) -> LocalAdapter | None:
        """Re-check a cache entry cheaply (sizes, header); None (and dropped) if damaged on disk."""
        try:
            manifest = Manifest.parse(str(aid), (path / MANIFEST_FILE).read_bytes())
            for fname, entry in manifest.files.items():
                if (path / fname).stat().st_size != entry.size:
                    raise InvalidAdapterError(str(aid), f"cached {fname} has the wrong size")
        except (OSError, InvalidAdapterError) as e:
            log.warning("dropping damaged cache entry %s and fetching again: %s", path, e)
            self.cache.remove(key)
            return None
        spec = validate_adapter_dir(str(aid), path, self.dims, self.max_rank)
        return LocalAdapter(aid, path, manifest, spec)

    def _matches_store(self, local: LocalAdapter, key: str) -> bool:
        """Whether a cached copy is still what the store holds under its version (else it is dropped).

        Asks the store for the manifest at most once per ``latest_ttl_s`` per version. A deleted
        version raises not-found; a store that does not answer is not a reason to stop serving a
        checked copy (an outage must not take cached adapters down), so the check is skipped for
        ``VERIFY_BACKOFF_S`` after a failure.
        """
        now = time.monotonic()
        if self._verified.get(local.id, 0.0) > now or self._unverifiable_until > now:
            return True
        try:
            current = self._read_manifest(local.id)
        except AdapterNotFoundError:
            self.cache.remove(key)
            self._verified.pop(local.id, None)
            raise
        except StoreUnavailableError as e:
            self._unverifiable_until = now + VERIFY_BACKOFF_S
            log.warning("serving cached %s unchecked for %gs: the store did not answer (%s)", local.id, VERIFY_BACKOFF_S, e)
            return True
        if current.content_digest != local.manifest.content_digest:
            log.warning(
                "the store's %s is not the content cached on this node (digest %s, cached %s): the version's "
                "objects were replaced outside `adapters push`; dropping the cached copy and fetching it again",
                local.id, current.content_digest[:12], local.manifest.content_digest[:12],
            )
            self.cache.remove(key)
            return False
        self._verified[local.id] = now + self.settings.latest_ttl_s
        return True

    def _download(self, aid: AdapterId, tmp: Path, progress: ProgressFactory | None) -> tuple[Manifest, AdapterSpec]:
        """Fill ``tmp`` with a checked, validated version; the manifest goes in last."""
        manifest = self._read_manifest(aid)
        limit = self.settings.max_adapter_bytes
        if manifest.total_bytes > limit:
            raise InvalidAdapterError(
                str(aid), f"adapter is {manifest.total_bytes} bytes, over the limit of {limit} (max_adapter_bytes)"
            )
        hashes = {}
        for fname, entry in manifest.files.items():
            cb = progress(f"{aid} {fname}", entry.size) if progress else None
            try:
                hashes[fname] = self.backend.download(f"{aid.name}/{aid.version}/{fname}", tmp / fname, cb)
            except ObjectMissing as e:
                raise InvalidAdapterError(str(aid), f"{fname} is in the manifest but missing from the store") from e
        verify_files(str(aid), manifest, tmp, hashes)
        spec = validate_adapter_dir(str(aid), tmp, self.dims, self.max_rank)
        if self.settings.check_finite:
            check_finite(str(aid), tmp)
        self._check_base_model(aid, spec)
        (tmp / MANIFEST_FILE).write_bytes(manifest.to_json())
        log.info("fetched %s (%d bytes) from %s", aid, manifest.total_bytes, self.backend.describe())
        return manifest, spec

    def _check_base_model(self, aid: AdapterId, spec: AdapterSpec) -> None:
        declared = spec.config.base_model_name_or_path
        if self.base_model_name is None or not declared:
            return
        def short(n: str) -> str:
            return n.rstrip("/").rsplit("/", 1)[-1].lower()

        if short(declared) != short(self.base_model_name):
            log.warning(
                "adapter %s was trained on %r, this server runs %r; serving it because its shapes fit",
                aid, declared, self.base_model_name,
            )

    # --- publishing ------------------------------------------------------------------------
    def push(
        self, src_dir: str | Path, adapter_id: str | AdapterId, progress: ProgressFactory | None = None
    ) -> Manifest:
        """Validate a local PEFT folder and publish it as a new, immutable version.

        Without ``@version`` the version is a UTC timestamp (see :func:`ids.new_version`). The
        adapter is checked against itself and against the store's profile (base model widths and
        ``max_rank``) before a byte is uploaded. The adapter files go up first and the manifest
        last, created only if absent, so a version is either invisible or complete, and an
        existing version is never overwritten; nor is a deleted one pushed again (its tombstone).
        """
        aid = parse_adapter_id(adapter_id)
        if not aid.pinned:
            aid = aid.with_version(new_version())
        src = Path(src_dir)
        if not src.is_dir():
            raise InvalidAdapterError(str(aid), f"{src} is not a folder")
        validate_adapter_dir(str(aid), src, max_rank=self.max_rank)  # before any request to the store
        dims, max_rank = self._push_limits()
        validate_adapter_dir(str(aid), src, dims, max_rank)
        total = sum((src / f).stat().st_size for f in ADAPTER_FILES)
        if total > self.settings.max_adapter_bytes:
            raise InvalidAdapterError(
                str(aid), f"adapter is {total} bytes, over the limit of {self.settings.max_adapter_bytes} (max_adapter_bytes)"
            )
        if self.settings.check_finite:
            check_finite(str(aid), src)
        base = f"{aid.name}/{aid.version}/"
        present = {o.key[len(base) :] for o in self.backend.list(base)}
        if MANIFEST_FILE in present:
            raise AdapterVersionExistsError(f"{aid} already exists in {self.backend.describe()}; versions are immutable")
        if TOMBSTONE_FILE in present:
            raise AdapterVersionExistsError(
                f"{aid} was deleted and a version string is never reused (caches may still hold the deleted "
                f"weights under it); push this adapter as a new version, e.g. {aid.name}@{new_version()} or "
                f"{aid.name} without a version"
            )
        manifest = build_manifest(aid.name, aid.version, src)
        for fname in ADAPTER_FILES:
            cb = progress(f"{aid} {fname}", manifest.files[fname].size) if progress else None
            self.backend.upload(src / fname, base + fname, cb)
        try:
            self.backend.write_bytes(base + MANIFEST_FILE, manifest.to_json(), if_absent=True)
        except ObjectExists as e:
            raise AdapterVersionExistsError(f"{aid} was pushed concurrently by someone else") from e
        self._forget_latest(aid.name)
        log.info("pushed %s (%d bytes) to %s", aid, total, self.backend.describe())
        return manifest

    def delete(self, adapter_id: str | AdapterId) -> None:
        """Delete one version: tombstone first, then the manifest (it vanishes atomically), then its files.

        The tombstone stays for good, so the version string is never pushed again with other
        content (see the module docstring).
        """
        aid = parse_adapter_id(adapter_id)
        if not aid.pinned:
            raise InvalidAdapterIdError(f"refusing to delete {aid.name!r} without a version: name it as {aid}@VERSION")
        base = f"{aid.name}/{aid.version}/"
        keys = [o.key for o in self.backend.list(base)]
        if base + MANIFEST_FILE not in keys:
            raise AdapterNotFoundError(str(aid), self.backend.describe())
        manifest = self._read_manifest(aid)
        tombstone = Tombstone(name=aid.name, version=aid.version, deleted_at=datetime.now(timezone.utc),
                              content_digest=manifest.content_digest)
        self.backend.write_bytes(base + TOMBSTONE_FILE, tombstone.to_json())
        self.backend.delete([base + MANIFEST_FILE])
        self.backend.delete([k for k in keys if k not in (base + MANIFEST_FILE, base + TOMBSTONE_FILE)])
        self.cache.remove(f"{self._cache_ns}/{aid.name}/{aid.version}")
        self._verified.pop(aid, None)
        self._forget_latest(aid.name)
        log.info("deleted %s from %s", aid, self.backend.describe())


def _make_backend(root: StoreRoot, settings: StoreSettings) -> ObjectStore:
    if isinstance(root, S3Root):
        from openlora_ray.store.s3 import S3ObjectStore  # boto3 only when an S3 store is used

        return S3ObjectStore(root, settings)
    return LocalObjectStore(root.path)


def _namespace(root: StoreRoot, settings: StoreSettings) -> str:
    """Cache sub-folder of one store, so two stores' ``name@version`` never collide."""
    where = f"{root}|{settings.endpoint_url or ''}" if isinstance(root, S3Root) else f"file|{root}"
    tag = str(root).rstrip("/").rsplit("/", 1)[-1] if isinstance(root, LocalRoot) else root.bucket
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in tag)[:32] or "store"
    return f"{safe}-{hashlib.sha256(where.encode()).hexdigest()[:12]}"
