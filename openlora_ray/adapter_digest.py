"""The content digest of an adapter: the identity of its weights, whatever its name or version.

Shared by the store (a manifest's digest) and the engine (a folder it was handed without one), so
both compute it the same way; it needs neither torch nor the store's backends.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# The files that make up an adapter's content (PEFT's save_pretrained layout).
CONTENT_FILES = ("adapter_config.json", "adapter_model.safetensors")
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def content_digest(file_digests: dict[str, str]) -> str:
    """sha256 of ``name:sha256`` lines in name order (see ``Manifest.content_digest``)."""
    lines = "".join(f"{name}:{digest}\n" for name, digest in sorted(file_digests.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def folder_digest(adapter_dir: str | Path) -> str:
    """The content digest of a local adapter folder, as a manifest of its files would give."""
    return content_digest({fname: sha256_file(Path(adapter_dir) / fname) for fname in CONTENT_FILES})
