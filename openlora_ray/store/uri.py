"""Store root URIs and adapter references.

A store root is ``s3://bucket[/prefix]`` (AWS S3, MinIO or any S3-compatible endpoint; the endpoint
itself is a setting, not part of the URI, exactly as with the AWS CLI), a ``file://`` URI, or a
plain local folder path. An adapter *reference* is a root followed by ``/name[@version]``, e.g.
``s3://adapters/prod/sql-helper@v3`` or ``/srv/adapters/sql-helper``: the last path component is the
adapter id, everything before it the root. That is the form the CLI takes for ``push``, ``inspect``,
``rm`` and ``fetch``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from openlora_ray.errors import InvalidAdapterIdError
from openlora_ray.store.ids import AdapterId, parse_adapter_id

# S3's own bucket rules (3-63 chars, lowercase, digits, dots, hyphens, alphanumeric at both ends).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class InvalidStoreUriError(InvalidAdapterIdError):
    """A store root that is not ``s3://bucket/prefix``, ``file://...`` or a folder path."""


@dataclass(frozen=True)
class S3Root:
    bucket: str
    prefix: str  # "" or "a/b" without leading/trailing slash

    def key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


@dataclass(frozen=True)
class LocalRoot:
    path: Path  # absolute

    def __str__(self) -> str:
        return str(self.path)


StoreRoot = S3Root | LocalRoot


def parse_store_uri(uri: str | Path) -> StoreRoot:
    """Parse a store root; raise InvalidStoreUriError naming what is wrong."""
    text = str(uri).strip()
    if not text:
        raise InvalidStoreUriError("empty store URI")
    if text.startswith("s3://"):
        rest = text[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if _BUCKET.fullmatch(bucket) is None or ".." in bucket:
            raise InvalidStoreUriError(f"store URI {text!r}: {bucket!r} is not a valid S3 bucket name")
        parts = [p for p in prefix.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise InvalidStoreUriError(f"store URI {text!r}: prefix may not contain '.' or '..'")
        return S3Root(bucket, "/".join(parts))
    if text.startswith("file://"):
        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidStoreUriError(f"store URI {text!r}: file:// URIs must name a local path")
        return LocalRoot(Path(unquote(parsed.path)).expanduser().resolve())
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise InvalidStoreUriError(f"store URI {text!r}: unsupported scheme {scheme!r} (use s3:// or a path)")
    return LocalRoot(Path(text).expanduser().resolve())


def split_reference(ref: str) -> tuple[StoreRoot, AdapterId]:
    """Split ``ROOT/name[@version]`` into its store root and adapter id."""
    text = str(ref).strip().rstrip("/")
    root, sep, last = text.rpartition("/")
    if not sep or not root or root.endswith(":/") or root == "s3:":
        raise InvalidStoreUriError(
            f"{ref!r} is not STORE_URI/NAME[@VERSION] (e.g. s3://bucket/prefix/name@v1 or ./store/name)"
        )
    return parse_store_uri(root), parse_adapter_id(last)
