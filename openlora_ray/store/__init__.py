"""Adapter store: PEFT adapters in S3/MinIO or a folder, a node-local disk cache, validation.

The engine and the Serve layer use :class:`AdapterStore` (``resolve``/``aresolve``); nothing here
imports torch. See ``store.py`` for the behaviour and ``settings.py`` for what can be configured.
"""

from openlora_ray.store.ids import AdapterId, new_version, parse_adapter_id
from openlora_ray.store.manifest import MANIFEST_FILE, Manifest
from openlora_ray.store.settings import StoreSettings
from openlora_ray.store.store import AdapterStore, AdapterVersionExistsError, LocalAdapter, VersionInfo

__all__ = [
    "MANIFEST_FILE",
    "AdapterId",
    "AdapterStore",
    "AdapterVersionExistsError",
    "LocalAdapter",
    "Manifest",
    "StoreSettings",
    "VersionInfo",
    "new_version",
    "parse_adapter_id",
]
