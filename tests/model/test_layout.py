"""Both weight layouts compute the same; loading frees each original projection as it fuses it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from openlora_ray.lora.weights import load_lora_weights
from openlora_ray.model.layout import choose_transposed
from openlora_ray.model.llama import MultiLoraLlama

PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


@torch.inference_mode()
def test_both_layouts_give_the_same_logits_with_adapters(tiny_model_dir, make_adapter):
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(9).expand(2, -1)
    outputs = []
    for transposed in (False, True):
        hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        model = MultiLoraLlama(hf, num_slots=1, max_rank=8, transposed=transposed)
        model.write_slot(0, load_lora_weights("a", make_adapter("layout-a", r=8, alpha=4.0, seed=5), model.dims, 8, torch.float32))
        assert all(g.transposed == transposed for layer in model.layers for g in layer.groups.values())
        outputs.append(model(tokens, positions, model.lora_batch([0, -1])))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_loading_releases_every_original_projection(tiny_model_dir):
    """The fused copies replace the HF weights layer by layer: the load never holds both."""
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    before = sum(getattr(getattr(layer, part), name).weight.nbytes for layer in hf.model.layers for part, names in PROJECTIONS.items() for name in names)
    model = MultiLoraLlama(hf, num_slots=1, max_rank=4)
    for layer in hf.model.layers:
        for part, names in PROJECTIONS.items():
            assert all(getattr(getattr(layer, part), name).weight is None for name in names)
    fused = sum(g.weight.nbytes for layer in model.layers for g in layer.groups.values())
    assert fused == before


@pytest.mark.parametrize("device", ["cpu"])
def test_layout_is_measured_on_cpu_and_returns_a_choice(device):
    assert choose_transposed(torch.device(device), torch.float32, 64, 320) in (True, False)
    assert choose_transposed(torch.device("meta"), torch.float32, 64, 320) is False  # not a CPU: as stored
