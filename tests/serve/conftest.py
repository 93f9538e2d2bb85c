"""A real local Ray cluster (fake GPUs) with Serve on a free loopback port, shared per module."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from peft_helpers import save_peft_adapter
from serve_helpers import free_port, metrics_port


@pytest.fixture(scope="module")
def serve_url() -> Iterator[str]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False, namespace="openlora-tests",
             _metrics_export_port=metrics_port(), runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def chat_store(tiny_chat_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local-folder adapter store holding real PEFT adapters of the tiny chat model."""
    from openlora_ray.store.settings import StoreSettings
    from openlora_ray.store.store import AdapterStore

    root = tmp_path_factory.mktemp("store")
    (root / "adapters").mkdir()
    store = AdapterStore(StoreSettings(uri=str(root / "adapters"), cache_dir=root / "push-cache"))
    work = tmp_path_factory.mktemp("adapters-src")
    specs = {
        "alpha": dict(r=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"), seed=51),
        "beta": dict(r=8, alpha=4.0, targets=("q_proj", "k_proj", "v_proj", "o_proj"), seed=52),
        "gamma": dict(r=2, alpha=6.0, targets=("gate_proj", "up_proj"), seed=53),
        "delta": dict(r=4, alpha=3.0, targets=("o_proj",), seed=54),
        "epsilon": dict(r=4, alpha=5.0, targets=("v_proj", "up_proj"), seed=56),
        "zeta": dict(r=2, alpha=3.0, targets=("k_proj",), seed=58),
        "eta": dict(r=4, alpha=2.0, targets=("q_proj", "o_proj"), seed=59),
        "theta": dict(r=8, alpha=6.0, targets=("down_proj",), seed=60),
        "iota": dict(r=2, alpha=5.0, targets=("q_proj",), seed=61),
        "kappa": dict(r=4, alpha=3.0, targets=("v_proj",), seed=62),
        "lambda": dict(r=2, alpha=1.0, targets=("o_proj",), seed=63),
        "mu": dict(r=4, alpha=6.0, targets=("up_proj",), seed=64),
        "acme.tone": dict(r=2, alpha=4.0, targets=("q_proj",), seed=57),  # owned by tenant acme
        "toolarge": dict(r=16, alpha=8.0, targets=("q_proj",), seed=55),  # above the servers' max_rank
    }
    for name, kw in specs.items():
        path = save_peft_adapter(tiny_chat_model_dir, work / name, kw["r"], kw["alpha"], kw["targets"], kw["seed"])
        store.push(path, f"{name}@v1")
    return root / "adapters"
