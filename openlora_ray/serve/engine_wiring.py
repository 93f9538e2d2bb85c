"""How a replica puts its engine, the adapter store and the node's disk cache together, without Ray.

The Serve deployment (``replica.py``) and ``bench scaling`` build through here, so the benchmark
measures the tiers exactly as a replica wires them: the engine's slots and host tier in front of
the store's node disk cache, which the engine's load workers reach through ``StoreResolver``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from openlora_ray.adapter_format import BaseModelDims
from openlora_ray.engine.adapters import ResolvedAdapter
from openlora_ray.engine.config import EngineConfig, EngineSettings
from openlora_ray.engine.engine import Engine
from openlora_ray.store.profile import PROFILE_FILE, StoreProfileError
from openlora_ray.store.settings import StoreSettings
from openlora_ray.store.store import AdapterStore

log = logging.getLogger(__name__)

FetchObserver = Callable[[str, float], None]
"""``observe(tier, seconds)`` after each resolve: tier ``disk`` (node cache hit) or ``store`` (downloaded)."""


def open_store(settings: StoreSettings, model_dir: Path, max_rank: int) -> AdapterStore:
    """The replica's view of the store, refused when the store's recorded profile says it serves
    another base model or larger ranks than this replica's slots hold (see ``check_store_profile``)."""
    dims = BaseModelDims.from_model_dir(model_dir)
    store = AdapterStore(settings, dims=dims, max_rank=max_rank)
    check_store_profile(store, dims, max_rank)
    return store


def check_store_profile(store: AdapterStore, dims: BaseModelDims, max_rank: int) -> None:
    """Refuse to serve a store recorded for other shapes: every push there was checked against
    them, so its adapters would fail here one request at a time. A store with no profile is served
    with a warning (its pushes were only checked for consistency in themselves)."""
    profile = store.profile()
    if profile is None:
        log.warning(
            "the adapter store records no base model (%s): pushes are not checked against this replica's model; "
            "record it with `openlora-ray adapters init --base-model DIR --max-rank %d`", PROFILE_FILE, max_rank,
        )
        return
    problem = profile.mismatch(dims, max_rank)
    if problem is not None:
        raise StoreProfileError(f"this replica cannot serve the configured adapter store: {problem}")


class StoreResolver:
    """The engine's ``AdapterResolver`` over a store: the adapter's folder in the node disk cache
    (downloaded on a miss) and its manifest's content digest. Called from the engine's workers."""

    def __init__(self, store: AdapterStore, observe: FetchObserver | None = None) -> None:
        self.store = store
        self._observe = observe
        self._lock = threading.Lock()
        self.fetches = {"disk": 0, "store": 0}

    def __call__(self, adapter_id: str) -> ResolvedAdapter:
        start = time.monotonic()
        local = self.store.fetch(adapter_id)
        tier = "store" if local.downloaded else "disk"
        with self._lock:
            self.fetches[tier] += 1
        if self._observe is not None:
            self._observe(tier, time.monotonic() - start)
        return ResolvedAdapter(local.path, local.manifest.content_digest)


def build_engine(
    settings: EngineSettings, model_dir: Path, store: AdapterStore | None, observe: FetchObserver | None = None
) -> tuple[Engine, StoreResolver | None]:
    """The replica's engine, resolving adapters through ``store`` (none: base model only)."""
    resolver = StoreResolver(store, observe) if store is not None else None
    return Engine(EngineConfig(model_path=model_dir, **settings.model_dump()), resolver), resolver
