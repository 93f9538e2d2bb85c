"""The per-version manifest: which files make up a version, their sizes and sha256.

A push uploads the adapter files first and the manifest last, so the manifest's presence is what
makes a version visible: a push that dies halfway leaves files that no reader will ever look at.
A fetch reads the manifest first, refuses a version that is too large before downloading anything,
and checks each downloaded file's size and sha256 against it, so a corrupted or swapped object is
an error instead of a silently wrong adapter.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from openlora_ray.adapter_digest import content_digest, sha256_file
from openlora_ray.adapter_format import CONFIG_FILE, WEIGHTS_FILE
from openlora_ray.errors import InvalidAdapterError

MANIFEST_FILE = "openlora-manifest.json"
# Left in a version's folder when it is deleted, so the version string is never pushed again with
# other weights: every cache tier (node disk, host RAM, slots) may still hold the deleted content
# under that string, and a version that silently changed content would be served stale.
TOMBSTONE_FILE = "openlora-deleted.json"
FORMAT_VERSION = 1
# The only files a version holds besides the manifest; anything else PEFT writes (README.md) is
# left out of the store because nothing at serving time reads it.
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(BaseModel):
    """What ``<name>/<version>/openlora-manifest.json`` holds."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    format: int = FORMAT_VERSION
    name: str
    version: str
    created_at: datetime
    files: dict[str, FileEntry]

    @field_validator("files")
    @classmethod
    def _only_known_files(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        # File names become local paths in the cache; only the fixed set is ever accepted.
        unknown = sorted(set(files) - set(ADAPTER_FILES))
        if unknown:
            raise ValueError(f"unexpected files {unknown}, a version holds only {list(ADAPTER_FILES)}")
        missing = [f for f in ADAPTER_FILES if f not in files]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        return files

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    @property
    def content_digest(self) -> str:
        """sha256 over the files' names and digests: the identity of the weights themselves.

        Unlike ``name@version`` it changes whenever the content does (a version string deleted and
        pushed again with other weights), and unlike the manifest's own bytes it ignores
        ``created_at``; caches of anything computed under an adapter (its KV prefix blocks) key on it.
        """
        return content_digest({name: entry.sha256 for name, entry in self.files.items()})

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()

    @classmethod
    def parse(cls, adapter_id: str, data: bytes) -> "Manifest":
        try:
            return cls.model_validate_json(data)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "manifest"
            raise InvalidAdapterError(adapter_id, f"bad {MANIFEST_FILE}: {where}: {first['msg']}") from e


class Tombstone(BaseModel):
    """What ``<name>/<version>/openlora-deleted.json`` holds: when, and which content was deleted."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    version: str
    deleted_at: datetime
    content_digest: str | None = None

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()


def build_manifest(name: str, version: str, adapter_dir: Path) -> Manifest:
    """Hash the adapter files of a local folder (already validated) into a manifest."""
    files = {}
    for fname in ADAPTER_FILES:
        path = adapter_dir / fname
        files[fname] = FileEntry(size=path.stat().st_size, sha256=sha256_file(path))
    return Manifest(name=name, version=version, created_at=datetime.now(timezone.utc), files=files)


def verify_files(adapter_id: str, manifest: Manifest, folder: Path, hashes: dict[str, str] | None = None) -> None:
    """Check sizes and sha256 of ``folder``'s files against ``manifest``.

    ``hashes`` holds digests already computed while downloading, so a fetch does not read the
    files twice; files absent from it are hashed here.
    """
    hashes = hashes or {}
    for fname, entry in manifest.files.items():
        path = folder / fname
        if not path.is_file():
            raise InvalidAdapterError(adapter_id, f"missing {fname}")
        size = path.stat().st_size
        if size != entry.size:
            raise InvalidAdapterError(
                adapter_id, f"{fname} is {size} bytes, the manifest says {entry.size} (truncated or replaced)"
            )
        digest = hashes.get(fname) or sha256_file(path)
        if digest != entry.sha256:
            raise InvalidAdapterError(
                adapter_id,
                f"sha256 mismatch for {fname}: manifest {entry.sha256[:12]}..., downloaded {digest[:12]}... "
                "(corrupted or replaced object)",
            )
