"""Node-local disk cache of downloaded adapter versions.

Layout under the cache folder::

    <store-key>/<name>/<version>/   one complete, validated version (entry)
    .tmp/                           downloads in progress, renamed into place when complete
    .locks/                         one lock file per entry, shared by every process on the node

An entry only ever appears through an atomic ``rename`` of a fully written and checked temp folder,
so its existence means it is complete; a failed download leaves nothing but a temp folder that is
removed on the spot. Concurrent requests for the same entry share one download: threads of one
process wait on an in-process lock, processes on the node on a ``filelock`` lock file, and every
waiter looks again once it holds the lock. Versions are immutable, so an entry never goes stale.

Recency for LRU is the entry folder's mtime, bumped on every hit, so every process sees the same
order without any shared index. Eviction drops least recently used entries until the cache is under
its byte budget, but never one used within ``evict_grace_s`` (a loader may be reading it right
now: :meth:`DiskCache.get_or_create` returns a path, not an open handle).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from filelock import FileLock, Timeout

from openlora_ray.errors import StoreUnavailableError

log = logging.getLogger(__name__)
T = TypeVar("T")
_STALE_TMP_S = 3600.0
# Eviction walks every entry; between walks a process counts what it adds itself, and walks again
# when that count crosses the budget or the last walk is this old (other processes add entries too).
# Walking on every download made warming a node with 2,000 adapters quadratic (minutes).
_RESCAN_S = 30.0


@dataclass(frozen=True)
class CacheEntry:
    key: str
    path: Path
    size: int
    last_used: float


def _touch(path: Path) -> None:
    # An explicit timestamp: ``utime(path)`` alone uses the kernel's coarse clock (a few ms), which
    # would make entries used in quick succession tie in LRU order.
    now = time.time_ns()
    os.utime(path, ns=(now, now))


class _KeyLock:
    """A lock object that can be weakly referenced (plain ``threading.Lock`` cannot)."""

    __slots__ = ("__weakref__", "lock")

    def __init__(self) -> None:
        self.lock = threading.Lock()


class DiskCache:
    """Byte-budgeted LRU cache of adapter folders, safe across threads and processes."""

    def __init__(
        self, root: Path, budget_bytes: int, evict_grace_s: float = 30.0, lock_timeout_s: float = 600.0
    ) -> None:
        self.root = Path(root).expanduser().resolve()
        self.budget_bytes = budget_bytes
        self.evict_grace_s = evict_grace_s
        self.lock_timeout_s = lock_timeout_s
        self._tmp = self.root / ".tmp"
        self._locks_dir = self.root / ".locks"
        self._estimate_lock = threading.Lock()
        self._estimate: int | None = None  # bytes at the last walk plus what this process added since
        self._scanned_at = 0.0
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._locks_dir.mkdir(parents=True, exist_ok=True)
        self._guard = threading.Lock()
        self._key_locks: weakref.WeakValueDictionary[str, _KeyLock] = weakref.WeakValueDictionary()
        self._remove_stale_tmp()

    # --- paths and locks -------------------------------------------------------------------
    def path(self, key: str) -> Path:
        parts = key.split("/")
        if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            raise ValueError(f"bad cache key {key!r}")
        return self.root.joinpath(*parts)

    def _file_lock(self, name: str) -> FileLock:
        digest = hashlib.sha256(name.encode()).hexdigest()[:32]
        return FileLock(self._locks_dir / f"{digest}.lock", timeout=self.lock_timeout_s)

    def _thread_lock(self, key: str) -> _KeyLock:
        with self._guard:
            kl = self._key_locks.get(key)
            if kl is None:
                kl = _KeyLock()
                self._key_locks[key] = kl
            return kl

    # --- lookups ---------------------------------------------------------------------------
    def lookup(self, key: str) -> Path | None:
        """The entry's folder if cached (and mark it used), else None. Never touches the network."""
        path = self.path(key)
        try:
            _touch(path)
        except FileNotFoundError:
            return None
        return path

    def get_or_create(self, key: str, populate: Callable[[Path], T]) -> tuple[Path, T | None]:
        """Return the entry for ``key``, calling ``populate(tmp_dir)`` to build it if absent.

        ``populate`` downloads and checks everything into an empty temp folder; if it raises,
        the folder is deleted and the error propagates, leaving the cache as it was. Returns the
        entry path and ``populate``'s result, or ``None`` when someone else built the entry.
        """
        kl = self._thread_lock(key)
        with kl.lock:
            hit = self.lookup(key)
            if hit is not None:
                return hit, None
            try:
                with self._file_lock(key):
                    hit = self.lookup(key)
                    if hit is not None:
                        return hit, None
                    path, result = self._build(key, populate)
            except Timeout as e:
                raise StoreUnavailableError(
                    f"waited {self.lock_timeout_s:g}s for another process fetching {key} into {self.root}"
                ) from e
        if self._may_be_over_budget(path):
            self.evict(keep=key)
        return path, result

    def _may_be_over_budget(self, added: Path) -> bool:
        size = sum(f.stat().st_size for f in added.iterdir() if f.is_file())
        with self._estimate_lock:
            if self._estimate is None or time.monotonic() - self._scanned_at > _RESCAN_S:
                return True
            self._estimate += size
            return self._estimate > self.budget_bytes

    def _build(self, key: str, populate: Callable[[Path], T]) -> tuple[Path, T]:
        final = self.path(key)
        tmp = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=self._tmp))
        try:
            result = populate(tmp)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _touch(final)
        log.debug("cached %s (%s)", key, final)
        return final, result

    # --- removal ---------------------------------------------------------------------------
    def remove(self, key: str) -> bool:
        """Drop one entry (e.g. its version was deleted, or its files were found damaged)."""
        with self._file_lock(key):
            return self._drop(self.path(key))

    def _drop(self, path: Path) -> bool:
        # Rename out first so the entry disappears atomically, then delete at leisure.
        trash = self._tmp / f"evict-{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def entries(self) -> list[CacheEntry]:
        """All complete entries, least recently used first."""
        out = []
        for store_dir in self._subdirs(self.root):
            for name_dir in self._subdirs(store_dir):
                for version_dir in self._subdirs(name_dir):
                    try:
                        size = sum(f.stat().st_size for f in version_dir.iterdir() if f.is_file())
                        mtime = version_dir.stat().st_mtime_ns / 1e9
                    except FileNotFoundError:  # evicted by another process while we looked
                        continue
                    key = version_dir.relative_to(self.root).as_posix()
                    out.append(CacheEntry(key, version_dir, size, mtime))
        out.sort(key=lambda e: e.last_used)
        return out

    @staticmethod
    def _subdirs(path: Path) -> list[Path]:
        try:
            return [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
        except FileNotFoundError:
            return []

    def size_bytes(self) -> int:
        return sum(e.size for e in self.entries())

    def evict(self, keep: str | None = None) -> list[str]:
        """Drop least recently used entries until under budget; return the evicted keys."""
        evicted: list[str] = []
        with self._file_lock(".evict"):
            entries = self.entries()
            total = sum(e.size for e in entries)
            self._counted(total)
            if total <= self.budget_bytes:
                return evicted
            now = time.time()
            for e in entries:
                if total <= self.budget_bytes:
                    break
                if e.key == keep or now - e.last_used < self.evict_grace_s:
                    continue
                if self._drop(e.path):
                    total -= e.size
                    evicted.append(e.key)
            self._counted(total)
            if total > self.budget_bytes:
                log.warning(
                    "adapter cache %s holds %d bytes, over its budget of %d: every remaining entry was "
                    "used in the last %gs; consider a larger cache_bytes",
                    self.root, total, self.budget_bytes, self.evict_grace_s,
                )
        if evicted:
            log.info("evicted %d adapter versions from %s: %s", len(evicted), self.root, ", ".join(evicted))
        return evicted

    def _counted(self, total: int) -> None:
        with self._estimate_lock:
            self._estimate, self._scanned_at = total, time.monotonic()

    def _remove_stale_tmp(self) -> None:
        """Temp folders left by processes that died mid-download (older than an hour)."""
        cutoff = time.time() - _STALE_TMP_S
        for p in self._tmp.iterdir():
            try:
                if p.stat().st_mtime < cutoff:
                    shutil.rmtree(p, ignore_errors=True)
            except FileNotFoundError:
                continue
