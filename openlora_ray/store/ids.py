"""Adapter identifiers: ``name`` or ``name@version``.

An id arrives from untrusted places (an HTTP request's ``model`` field, a CLI argument) and later
becomes one component of an S3 key and of a cache path. It is therefore checked against a strict
whitelist *before* anything else sees it: lowercase letters, digits, ``.``, ``_`` and ``-``, starting
with a letter or digit, bounded length. That rules out separators, ``..``, absolute paths, NUL and
whitespace by construction, and lowercase-only keeps two ids from colliding on a case-insensitive
filesystem (macOS, Windows) in the cache.

Versions are immutable. A push without an explicit version gets :func:`new_version`, a UTC
timestamp to the microsecond (``20250131-235959-123456``), which sorts in push order as text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone

from openlora_ray.errors import InvalidAdapterIdError

MAX_NAME_LEN = 64
MAX_VERSION_LEN = 64
_PART = re.compile(r"[a-z0-9][a-z0-9._-]*")
ALLOWED = "lowercase letters, digits, '.', '_' and '-', starting with a letter or digit"


@dataclass(frozen=True, order=True)
class AdapterId:
    """A parsed adapter id; ``version is None`` means "the newest version"."""

    name: str
    version: str | None = None

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"

    @property
    def pinned(self) -> bool:
        return self.version is not None

    def with_version(self, version: str) -> "AdapterId":
        return AdapterId(self.name, check_version(version, str(self)))


def _check_part(value: str, what: str, limit: int, raw: str) -> str:
    shown = raw if len(raw) <= 80 else raw[:77] + "..."
    if not value:
        raise InvalidAdapterIdError(f"invalid adapter id {shown!r}: empty {what}")
    if len(value) > limit:
        raise InvalidAdapterIdError(
            f"invalid adapter id {shown!r}: {what} is {len(value)} characters, at most {limit} allowed"
        )
    if _PART.fullmatch(value) is None:
        raise InvalidAdapterIdError(f"invalid adapter id {shown!r}: {what} may only contain {ALLOWED}")
    return value


def check_version(version: str, raw: str | None = None) -> str:
    """Return ``version`` if it is a valid version string, else raise InvalidAdapterIdError."""
    if not isinstance(version, str):
        raise InvalidAdapterIdError(f"invalid adapter version {version!r}: not a string")
    return _check_part(version, "version", MAX_VERSION_LEN, raw if raw is not None else version)


def parse_adapter_id(raw: str | AdapterId) -> AdapterId:
    """Parse ``name`` or ``name@version``; raise InvalidAdapterIdError with the reason otherwise."""
    if isinstance(raw, AdapterId):
        return raw
    if not isinstance(raw, str):
        raise InvalidAdapterIdError(f"invalid adapter id {raw!r}: not a string")
    if raw.count("@") > 1:
        raise InvalidAdapterIdError(f"invalid adapter id {raw[:80]!r}: more than one '@'")
    name, sep, version = raw.partition("@")
    _check_part(name, "name", MAX_NAME_LEN, raw)
    if not sep:
        return AdapterId(name)
    return AdapterId(name, _check_part(version, "version", MAX_VERSION_LEN, raw))


def new_version(now: datetime | None = None) -> str:
    """A fresh version string: UTC time to the microsecond, sortable as text in push order."""
    now = now or datetime.now(timezone.utc)
    return now.astimezone(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")


def version_sort_key(version: str) -> tuple:
    """Natural order (``v2`` < ``v10``) used to break ties between versions pushed together."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.findall(r"\d+|\D+", version))
