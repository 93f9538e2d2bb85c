"""Helpers for tests against a real local Ray Serve cluster."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_METRICS_PORT: list[int] = []


def metrics_port() -> int:
    """The Prometheus port of this test session's Ray node (chosen once)."""
    if not _METRICS_PORT:
        _METRICS_PORT.append(free_port())
    return _METRICS_PORT[0]


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.2) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(interval)
