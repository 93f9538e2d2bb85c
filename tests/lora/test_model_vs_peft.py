"""Mixed-adapter batches through MultiLoraLlama match PEFT's own mixed batch, row by row."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from openlora_ray.lora.ops import NO_ADAPTER
from openlora_ray.lora.weights import load_lora_weights
from openlora_ray.model.loader import load_multi_lora_model

ADAPTERS = {
    # name: (r, alpha, targets, rslora)
    "all-r8": (8, 16.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), False),
    "qv-r4": (4, 12.0, ("q_proj", "v_proj"), False),
    "mlp-r2": (2, 3.0, ("gate_proj", "down_proj"), False),
    "rs-r6": (6, 5.0, ("k_proj", "o_proj", "up_proj"), True),
}


@pytest.fixture(scope="module")
def adapter_dirs(make_adapter):
    return {n: make_adapter(n, r, a, t, seed=i + 10, use_rslora=rs) for i, (n, (r, a, t, rs)) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def peft_model(tiny_model_dir, adapter_dirs):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(base, adapter_dirs[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(adapter_dirs[n], adapter_name=n)
    return model.eval()


@pytest.fixture(scope="module")
def ours(tiny_model_dir, adapter_dirs):
    model = load_multi_lora_model(tiny_model_dir, num_slots=6, max_rank=8, dtype=torch.float32)
    slots = {}
    for slot, (name, path) in zip([4, 0, 2, 5], adapter_dirs.items()):  # scattered slots on purpose
        model.write_slot(slot, load_lora_weights(name, path, model.dims, model.max_rank, model.dtype))
        slots[name] = slot
    return model, slots


@torch.inference_mode()
def test_mixed_batch_logits_match_peft(ours, peft_model):
    model, slots = ours
    rows = ["all-r8", None, "qv-r4", "mlp-r2", "rs-r6", "all-r8", None, "rs-r6"]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (len(rows), 12), generator=gen)
    positions = torch.arange(12).expand(len(rows), -1)
    got = model(tokens, positions, model.lora_batch([slots[r] if r else NO_ADAPTER for r in rows]))
    want = peft_model(input_ids=tokens, adapter_names=[r or "__base__" for r in rows]).logits
    for i, r in enumerate(rows):
        torch.testing.assert_close(got[i], want[i], rtol=1e-4, atol=1e-4, msg=f"row {i} ({r})")
    base = model(tokens, positions, None)
    for i, r in enumerate(rows):  # adapters really change the output: the test is not vacuous
        assert (r is None) == torch.allclose(base[i], got[i], atol=1e-5), f"row {i} ({r})"


@torch.inference_mode()
def test_base_only_batch_matches_transformers(ours, tiny_model_dir):
    model, _ = ours
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokens = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(1))
    got = model(tokens, torch.arange(9).expand(3, -1), model.lora_batch([NO_ADAPTER] * 3))
    torch.testing.assert_close(got, hf(input_ids=tokens).logits, rtol=1e-4, atol=1e-4)
