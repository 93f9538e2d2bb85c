"""Helpers for tests against a real local Ray Serve cluster."""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path


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


def uneven_memory_replica(claims_dir: Path, kv_blocks: Sequence[int]) -> type:
    """A ``LoraReplica`` class whose replicas differ in memory, as on GPUs of different sizes.

    A replica's memory for new work is its KV cache (and slots); every replica of a deployment
    gets the same config, so here the i-th replica to start takes ``kv_blocks[i]`` blocks (the last
    value for the rest), numbered through exclusive files in ``claims_dir``. Defined in a function
    so that cloudpickle ships the class by value: Ray's workers cannot import tests/.
    """
    from openlora_ray.serve.replica import LoraReplica

    def claim(path: Path) -> bool:
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return False
        return True

    class UnevenMemoryReplica(LoraReplica):
        def __init__(self, config: dict) -> None:
            ordinal = next(i for i in itertools.count() if claim(claims_dir / f"replica-{i}"))
            blocks = kv_blocks[min(ordinal, len(kv_blocks) - 1)]
            super().__init__({**config, "engine": {**config["engine"], "num_kv_blocks": blocks}})

    return UnevenMemoryReplica
