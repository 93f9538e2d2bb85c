"""``--model`` of the benches, the demo and ``serve``: a name of ``model prepare`` or a folder.

Nothing is downloaded or converted here: ``prepare_model`` is replaced by a recorder, so these
tests check the plumbing (which model each command asks for, and which store it uses) in
milliseconds; the real conversions are tested where the packages are installed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from openlora_ray.cli import main
from openlora_ray.model import prepare
from openlora_ray.model.prepare import DEMO_MODEL_NAME, default_store_uri, resolve_model


@pytest.fixture
def prepared(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """Names ``prepare_model`` was asked for; each "prepares" to ``tmp_path/models/<name>``."""
    asked: list[str] = []

    def fake_prepare(name: str, cache_root: Path | None = None, force: bool = False) -> Path:
        asked.append(name)
        return tmp_path / "models" / name

    monkeypatch.setattr(prepare, "prepare_model", fake_prepare)
    return asked


def test_a_name_is_prepared_a_folder_is_taken_as_given(prepared, tmp_path):
    assert resolve_model(None) == tmp_path / "models" / DEMO_MODEL_NAME
    assert resolve_model("gemma3-270m") == tmp_path / "models" / "gemma3-270m"
    assert prepared == [DEMO_MODEL_NAME, "gemma3-270m"]
    folder = tmp_path / "my-model"
    assert resolve_model(str(folder)) == folder and resolve_model("~/m") == Path.home() / "m"
    assert len(prepared) == 2  # a folder is never prepared


def test_each_prepared_model_has_its_own_default_store(tmp_path):
    assert default_store_uri(cache_root=tmp_path) == str(tmp_path / "store")  # unchanged for the demo model
    assert default_store_uri("gemma3-270m", tmp_path) == str(tmp_path / "store-gemma3-270m")


@pytest.mark.parametrize("bench", ["lora", "engine", "kv", "scaling"])
@pytest.mark.parametrize("model", ["gemma3-270m", None, "FOLDER"])
def test_bench_model_takes_a_prepared_name_or_a_folder(bench, model, prepared, tmp_path, monkeypatch):
    import importlib

    module = importlib.import_module(f"openlora_ray.bench.{bench}_bench")
    ran: list[Path] = []
    monkeypatch.setattr(module, "run", lambda model_dir, *args, **kwargs: ran.append(model_dir))
    folder = tmp_path / "folder"
    argv = ["bench", bench, "--out", str(tmp_path / "out.json")]
    if model is not None:
        argv += ["--model", str(folder) if model == "FOLDER" else model]
    assert main(argv) == 0
    want = {"gemma3-270m": tmp_path / "models" / "gemma3-270m", None: tmp_path / "models" / DEMO_MODEL_NAME}
    assert ran == [want.get(model, folder)]
    assert prepared == ([] if model == "FOLDER" else [model or DEMO_MODEL_NAME])


def test_serve_uses_the_store_of_the_model_it_serves(monkeypatch, tmp_path):
    from openlora_ray.serve.cli import local_config

    monkeypatch.setenv("OPENLORA_CACHE", str(tmp_path))
    def args(**kw) -> argparse.Namespace:
        return argparse.Namespace(**{"config": None, "store": None, "model": None, "replicas": None, **kw})

    gemma = local_config(args(model="gemma3-270m"))
    assert gemma.store.uri == str(tmp_path / "store-gemma3-270m") and gemma.served_model_name == "gemma3-270m"
    assert local_config(args(model="gemma3-270m", store="s3://b/p")).store.uri == "s3://b/p"
    folder = local_config(args(model=str(tmp_path / "Qwen2.5-7B-Instruct") + "/"))
    assert folder.store.uri != gemma.store.uri and folder.served_model_name == "Qwen2.5-7B-Instruct"
    assert local_config(args()).served_model_name == local_config(args(model="demo")).served_model_name == DEMO_MODEL_NAME
