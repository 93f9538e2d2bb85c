"""Bounded values for the Prometheus ``model`` label.

A request's ``model`` is the client's raw string; used as a label value, every distinct string a
client sends would create new time series in the ingress and in Prometheus. Only the served base
model's name and the names of adapters that resolved in the store become label values (by name,
without the version, so a series survives a new push); anything else is counted as ``unknown``.
The set of names is bounded by the store's contents, not by what clients send.
"""

from __future__ import annotations

import threading
from typing import Any

UNKNOWN = "unknown"


class ModelLabels:
    def __init__(self, served_model_name: str) -> None:
        self._known = {served_model_name}
        self._lock = threading.Lock()

    def admit(self, model: str) -> None:
        """``model`` named an adapter that exists (it resolved in the store): label it by name."""
        with self._lock:
            self._known.add(model.split("@", 1)[0])

    def __call__(self, model: Any) -> str:
        name = model.split("@", 1)[0] if isinstance(model, str) else None
        return name if name in self._known else UNKNOWN


class Labelled:
    """A Ray Serve metric whose ``model`` tag is passed through :class:`ModelLabels` on every use."""

    def __init__(self, metric: Any, labels: ModelLabels) -> None:
        self._metric = metric
        self._labels = labels

    def _tags(self, tags: dict[str, str] | None) -> dict[str, str] | None:
        if tags is None or "model" not in tags:
            return tags
        return {**tags, "model": self._labels(tags["model"])}

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self._metric.inc(value, tags=self._tags(tags))

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._metric.observe(value, tags=self._tags(tags))
