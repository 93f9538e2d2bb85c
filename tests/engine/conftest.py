"""Engine fixtures: engines built per test and shut down after it."""

from __future__ import annotations

import pytest

from openlora_ray.engine.engine import Engine


@pytest.fixture
def engine_factory():
    engines: list[Engine] = []

    def make(config, resolver=None) -> Engine:
        engine = Engine(config, resolver)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown(drain_timeout_s=1)
