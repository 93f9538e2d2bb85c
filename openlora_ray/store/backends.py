"""The object-store protocol the adapter store is written against, and its local-folder backend.

The :class:`AdapterStore` only needs six operations on flat, ``/``-separated keys relative to the
store root, so S3 (see :mod:`openlora_ray.store.s3`) and a plain folder (here; for development,
tests, and shared filesystems such as NFS) are interchangeable. Keys are always built by the store
from validated ids, never taken from users, but the local backend still refuses anything that
would leave its root.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from openlora_ray.errors import StoreUnavailableError

Progress = Callable[[int], None]
"""Called with the number of bytes just transferred."""

_CHUNK = 1 << 20


class ObjectMissing(KeyError):
    """The key does not exist (mapped to AdapterNotFoundError by the store)."""


class ObjectExists(FileExistsError):
    """A create-only write found the key already there (an immutable version pushed twice)."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    last_modified: datetime


class ObjectStore(Protocol):
    """What :class:`~openlora_ray.store.store.AdapterStore` needs from a storage backend."""

    def describe(self) -> str:
        """Where this store is, for error messages (endpoint, bucket, folder)."""

    def list(self, prefix: str, start_after: str = "") -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix``, in key order, following pagination lazily.

        With ``start_after``, only keys greater than it (S3's ``StartAfter``): a caller that stops
        iterating early pays only for the pages it read, which is what makes listing a page of a
        10,000-adapter store cheap.
        """

    def read_bytes(self, key: str) -> bytes:
        """A small object's content; raises ObjectMissing."""

    def download(self, key: str, dest: Path, progress: Progress | None = None) -> str:
        """Stream an object to ``dest`` and return its sha256 hex digest; raises ObjectMissing."""

    def upload(self, src: Path, key: str, progress: Progress | None = None) -> None:
        """Upload a local file to ``key`` (overwriting: only invisible, manifest-less keys)."""

    def write_bytes(self, key: str, data: bytes, if_absent: bool = False) -> None:
        """Write a small object; with ``if_absent``, raise ObjectExists instead of overwriting."""

    def delete(self, keys: list[str]) -> None:
        """Delete keys; missing keys are not an error."""


def copy_hashing(src, dst, progress: Progress | None) -> str:
    """Copy a binary stream to another while hashing; return the sha256 hex digest."""
    h = hashlib.sha256()
    while chunk := src.read(_CHUNK):
        h.update(chunk)
        dst.write(chunk)
        if progress is not None:
            progress(len(chunk))
    return h.hexdigest()


class LocalObjectStore:
    """Objects as files under a folder; every write is a temp file plus an atomic rename."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def describe(self) -> str:
        return f"local folder {self.root}"

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") or p.startswith(".tmp-") for p in parts):
            raise ValueError(f"bad object key {key!r}")
        return self.root.joinpath(*parts)

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise StoreUnavailableError(f"store folder {self.root} does not exist or is not a folder")

    def list(self, prefix: str, start_after: str = "") -> Iterator[ObjectInfo]:
        self._check_root()
        yield from self._walk(self.root, "", prefix, start_after)

    def _walk(self, folder: Path, base: str, prefix: str, start_after: str) -> Iterator[ObjectInfo]:
        """Files under ``folder`` in S3's key order, skipping whole folders outside the range.

        A folder ``d`` holds the keys ``d/...``, which sort as ``d/`` does: entries are ordered by
        that, so ``a-b/x`` comes before ``a/x`` exactly as S3 lists them.
        """
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:  # removed by a concurrent delete while we walked
            return
        ordered = sorted(((e.name + "/" if e.is_dir() else e.name), e) for e in entries if not e.name.startswith("."))
        for name, entry in ordered:
            key = base + name
            if entry.is_dir():
                # Every key below sorts before key[:-1] + "0" ('0' follows '/'); skip subtrees
                # wholly at or before start_after, or outside the prefix.
                if start_after and key[:-1] + "0" <= start_after:
                    continue
                if not (key.startswith(prefix) or prefix.startswith(key)):
                    continue
                yield from self._walk(Path(entry.path), key, prefix, start_after)
            elif key.startswith(prefix) and key > start_after:
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                yield ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, timezone.utc))

    def read_bytes(self, key: str) -> bytes:
        self._check_root()
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError as e:
            raise ObjectMissing(key) from e

    def download(self, key: str, dest: Path, progress: Progress | None = None) -> str:
        self._check_root()
        try:
            src = open(self._path(key), "rb")
        except FileNotFoundError as e:
            raise ObjectMissing(key) from e
        with src, open(dest, "wb") as dst:
            return copy_hashing(src, dst, progress)

    def _atomic_write(self, key: str, write: Callable[[object], None], if_absent: bool = False) -> None:
        self._check_root()
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            if if_absent:
                try:
                    os.link(tmp, path)  # fails if present: create-only, atomic on POSIX
                except FileExistsError as e:
                    raise ObjectExists(key) from e
            else:
                os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def upload(self, src: Path, key: str, progress: Progress | None = None) -> None:
        def write(dst) -> None:
            with open(src, "rb") as f:
                copy_hashing(f, dst, progress)

        self._atomic_write(key, write)

    def write_bytes(self, key: str, data: bytes, if_absent: bool = False) -> None:
        self._atomic_write(key, lambda f: f.write(data), if_absent=if_absent)

    def delete(self, keys: list[str]) -> None:
        self._check_root()
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            # Drop now-empty version/name folders so listings stay clean.
            for parent in (path.parent, path.parent.parent):
                if parent == self.root:
                    break
                try:
                    parent.rmdir()
                except OSError:  # not empty: other files or versions remain
                    break
