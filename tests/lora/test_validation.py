"""Adapters that cannot be served are refused before any weight reaches a slot, with a reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from openlora_ray.adapter_format import CONFIG_FILE, WEIGHTS_FILE, BaseModelDims
from openlora_ray.errors import InvalidAdapterError
from openlora_ray.lora.weights import load_lora_weights


@pytest.fixture()
def good(make_adapter, tmp_path) -> Path:
    src = make_adapter("good", r=4, alpha=8.0, seed=5)
    dst = tmp_path / "adapter"
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def dims(tiny_model_dir) -> BaseModelDims:
    return BaseModelDims.from_model_dir(tiny_model_dir)


def _load(path: Path, dims: BaseModelDims, max_rank: int = 8):
    return load_lora_weights("tenant/x", path, dims, max_rank, torch.float32)


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / CONFIG_FILE).read_text())
    cfg.update(changes)
    (path / CONFIG_FILE).write_text(json.dumps(cfg))


def _edit_tensors(path: Path, fn) -> None:
    tensors = load_file(path / WEIGHTS_FILE)
    fn(tensors)
    save_file(tensors, path / WEIGHTS_FILE)


def test_good_adapter_loads_with_scale_folded_in(good, dims):
    weights = _load(good, dims)
    assert weights.rank == 4 and len(weights.modules) == 3 * 7
    raw = load_file(good / WEIGHTS_FILE)
    a, b_t = weights.modules[(1, "up_proj")]
    assert b_t.is_contiguous()  # stored as the slots hold it: B^T (r, out)
    torch.testing.assert_close(b_t.T, raw["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"] * 2.0)  # alpha/r
    torch.testing.assert_close(a, raw["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"])


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda p: None, "rank 4 exceeds the server's max_rank 2"),
        (lambda p: _edit_config(p, use_dora=True), "DoRA"),
        (lambda p: _edit_config(p, modules_to_save=["lm_head"]), "modules_to_save"),
        (lambda p: _edit_config(p, bias="all"), "trained biases"),
        (lambda p: _edit_config(p, peft_type="PREFIX_TUNING"), "only LORA"),
        (lambda p: _edit_config(p, target_modules=["q_proj", "fc1"]), "target_modules ['fc1']"),
        (lambda p: _edit_config(p, r="many"), "adapter_config.json: r:"),
        (lambda p: (p / CONFIG_FILE).unlink(), "missing adapter_config.json"),
        (lambda p: _edit_tensors(p, lambda t: t.__setitem__("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", torch.zeros(4, 65))), "expected [4, 64]"),
        (lambda p: _edit_tensors(p, lambda t: t.__setitem__("base_model.model.model.layers.7.mlp.up_proj.lora_A.weight", torch.zeros(4, 64))), "layer 7, base model has 3"),
        (lambda p: _edit_tensors(p, lambda t: t.__setitem__("base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector", torch.zeros(160))), "DoRA"),
        (lambda p: _edit_tensors(p, lambda t: t.__setitem__("base_model.model.lm_head.weight", torch.zeros(256, 64))), "unsupported tensor"),
        (lambda p: _edit_tensors(p, lambda t: t.pop("base_model.model.model.layers.2.mlp.down_proj.lora_B.weight")), "not both"),
        (lambda p: _edit_tensors(p, lambda t: t["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].__setitem__((0, 0), float("nan"))), "NaN or infinite"),
        (lambda p: _edit_tensors(p, lambda t: t.__setitem__("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", torch.zeros(4, 64, dtype=torch.int32))), "dtype I32"),
    ],
    ids=["rank", "dora", "modules_to_save", "bias", "peft_type", "unknown_target", "bad_field", "no_config", "shape", "layer", "dora_tensor", "lm_head", "unpaired", "nan", "int_dtype"],
)
def test_unservable_adapters_are_refused_with_a_reason(good, dims, mutate, reason):
    mutate(good)
    with pytest.raises(InvalidAdapterError, match="tenant/x") as err:
        _load(good, dims, max_rank=2 if reason.startswith("rank") else 8)
    assert reason in str(err.value)


def test_pickle_only_adapter_is_never_loaded(good, dims):
    (good / WEIGHTS_FILE).rename(good / "adapter_model.bin")
    with pytest.raises(InvalidAdapterError, match="pickled .bin"):
        _load(good, dims)


def test_truncated_safetensors_is_refused(good, dims):
    data = (good / WEIGHTS_FILE).read_bytes()
    (good / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidAdapterError, match="not a valid safetensors file"):
        _load(good, dims)


def test_adapter_for_another_base_model_is_refused(good):
    other = BaseModelDims(hidden_size=128, intermediate_size=160, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32)
    with pytest.raises(InvalidAdapterError, match="expected"):
        _load(good, other)


def test_domain_errors_survive_pickling():
    """Ray ships a replica's exception to the caller by pickle; it must arrive as the same type."""
    import pickle

    from openlora_ray.errors import AdapterNotFoundError

    for err in (InvalidAdapterError("a@v1", "rank 64 exceeds"), AdapterNotFoundError("b", "the store")):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)
