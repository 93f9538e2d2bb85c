"""Adapters for mixture-of-experts bases: attention and dense layers are served, per-expert LoRA is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from openlora_ray.adapter_format import (
    CONFIG_FILE,
    PER_EXPERT_REFUSAL,
    WEIGHTS_FILE,
    BaseModelDims,
    validate_adapter_dir,
)
from openlora_ray.errors import InvalidAdapterError
from openlora_ray.store.profile import StoreProfile
from openlora_ray.store.settings import StoreSettings
from openlora_ray.store.store import AdapterStore


def peft_adapter(base_dir: Path, out: Path, **lora) -> Path:
    """A real PEFT adapter with non-zero B, of any LoraConfig (target_parameters included)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, lora_alpha=8, **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(out, safe_serialization=True)
    return out


def hand_made(out: Path, keys: dict[str, tuple[int, int]], targets: list[str]) -> Path:
    out.mkdir()
    save_file({k: torch.randn(shape) for k, shape in keys.items()}, str(out / WEIGHTS_FILE))
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": targets}
    (out / CONFIG_FILE).write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def dims(tiny_qwen3_moe_dir) -> BaseModelDims:
    return BaseModelDims.from_model_dir(tiny_qwen3_moe_dir)


def test_sparse_layers_follow_decoder_sparse_step_and_mlp_only_layers(dims):
    assert dims.sparse_mlp_layers == (0, 1, 3)
    from openlora_ray.adapter_format import _sparse_mlp_layers

    cfg = {"model_type": "qwen3_moe", "num_hidden_layers": 6, "num_experts": 8, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    assert _sparse_mlp_layers(cfg) == (1, 5)
    assert _sparse_mlp_layers({**cfg, "num_experts": 0}) == ()
    assert _sparse_mlp_layers({**cfg, "model_type": "mixtral"}) == tuple(range(6))
    assert _sparse_mlp_layers({**cfg, "model_type": "llama"}) == ()


def test_attention_adapters_are_accepted(tiny_qwen3_moe_dir, dims, tmp_path):
    out = peft_adapter(tiny_qwen3_moe_dir, tmp_path / "a", target_modules=["q_proj", "v_proj", "o_proj"])
    spec = validate_adapter_dir("t/a", out, dims, max_rank=8)
    assert spec.targets == {(layer, p) for layer in range(4) for p in ("q_proj", "v_proj", "o_proj")}


def test_peft_mlp_targets_on_a_moe_base_become_expert_lora_and_are_refused(tiny_qwen3_moe_dir, dims, tmp_path):
    """PEFT 0.21 on transformers 5 turns gate/up/down_proj targets into ``target_parameters`` on the
    stacked experts (and then leaves the dense layer's MLP alone): such an adapter is per-expert LoRA."""
    out = peft_adapter(tiny_qwen3_moe_dir, tmp_path / "mlp", target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"])
    with pytest.raises(InvalidAdapterError) as e:
        validate_adapter_dir("t/mlp", out, dims, max_rank=8)
    assert PER_EXPERT_REFUSAL in str(e.value)


def test_peft_target_parameters_on_experts_are_refused(tiny_qwen3_moe_dir, dims, tmp_path):
    out = peft_adapter(tiny_qwen3_moe_dir, tmp_path / "experts", target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"])
    with pytest.raises(InvalidAdapterError) as e:
        validate_adapter_dir("t/experts", out, dims, max_rank=8)
    assert PER_EXPERT_REFUSAL in str(e.value) and "target_parameters" in str(e.value)


@pytest.mark.parametrize(
    "key",
    [
        "base_model.model.model.layers.1.mlp.experts.3.gate_proj.lora_{}.weight",  # transformers 4 layout
        "base_model.model.model.layers.1.block_sparse_moe.experts.0.w1.lora_{}.weight",  # Mixtral's
        "base_model.model.model.layers.1.mlp.gate.lora_{}.weight",  # the router
    ],
)
def test_per_expert_and_router_tensors_are_refused_even_without_a_base(tmp_path, key):
    out = hand_made(tmp_path / "x", {key.format("A"): (4, 64), key.format("B"): (32, 4)}, ["gate_proj"])
    with pytest.raises(InvalidAdapterError, match="per-expert LoRA"):
        validate_adapter_dir("t/x", out)


def test_an_mlp_tensor_on_a_sparse_layer_is_refused_with_the_base(dims, tmp_path):
    base = "base_model.model.model.layers.{}.mlp.gate_proj.lora_{}.weight"
    ok = hand_made(tmp_path / "dense", {base.format(2, "A"): (4, 64), base.format(2, "B"): (160, 4)}, ["gate_proj"])
    validate_adapter_dir("t/dense", ok, dims)
    bad = hand_made(tmp_path / "sparse", {base.format(1, "A"): (4, 64), base.format(1, "B"): (160, 4)}, ["gate_proj"])
    with pytest.raises(InvalidAdapterError, match="layer 1, a mixture-of-experts layer"):
        validate_adapter_dir("t/sparse", bad, dims)


def test_push_refuses_per_expert_adapters(tiny_qwen3_moe_dir, tmp_path):
    (tmp_path / "store").mkdir()
    store = AdapterStore(StoreSettings(uri=str(tmp_path / "store"), cache_dir=tmp_path / "cache"))
    store.init(StoreProfile.from_model_dir(tiny_qwen3_moe_dir, max_rank=8))
    experts = peft_adapter(tiny_qwen3_moe_dir, tmp_path / "e", target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"])
    with pytest.raises(InvalidAdapterError, match="per-expert LoRA"):
        store.push(experts, "acme.experts")
    base = "base_model.model.model.layers.{}.mlp.up_proj.lora_{}.weight"
    sparse = hand_made(tmp_path / "s", {base.format(0, "A"): (4, 64), base.format(0, "B"): (160, 4)}, ["up_proj"])
    with pytest.raises(InvalidAdapterError, match="mixture-of-experts layer"):
        store.push(sparse, "acme.sparse")
    attention = peft_adapter(tiny_qwen3_moe_dir, tmp_path / "q", target_modules=["q_proj", "k_proj"])
    assert store.push(attention, "acme.attention").name == "acme.attention"


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory) -> Path:
    from family_models import build

    return build("mixtral", tmp_path_factory.mktemp("mixtral"))


def test_mixtral_attention_adapters_are_accepted_and_every_mlp_layer_is_sparse(mixtral_dir, tmp_path):
    dims = BaseModelDims.from_model_dir(mixtral_dir)
    assert dims.sparse_mlp_layers == (0, 1, 2, 3)
    out = peft_adapter(mixtral_dir, tmp_path / "a", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    spec = validate_adapter_dir("t/a", out, dims, max_rank=8)
    assert spec.projections == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_mixtral_expert_adapters_are_refused_as_per_expert_lora(mixtral_dir, tmp_path):
    """PEFT 0.21 turns Mixtral's w1/w2/w3 targets into ``target_parameters`` on the stacked experts;
    an adapter trained under transformers 4 lists them as modules and holds per-expert tensors."""
    dims = BaseModelDims.from_model_dir(mixtral_dir)
    peft_made = peft_adapter(mixtral_dir, tmp_path / "peft", target_modules=["q_proj", "w1", "w2", "w3"])
    key = "base_model.model.model.layers.0.block_sparse_moe.experts.1.w1.lora_{}.weight"
    old = hand_made(tmp_path / "old", {key.format("A"): (4, 64), key.format("B"): (96, 4)}, ["w1", "w2", "w3"])
    for folder in (peft_made, old):
        with pytest.raises(InvalidAdapterError) as e:
            validate_adapter_dir("t/x", folder, dims, max_rank=8)
        assert PER_EXPERT_REFUSAL in str(e.value)
    assert "Mixtral's expert projections" in str(e.value)
