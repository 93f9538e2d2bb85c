"""Mixtral through the engine's loader: what the spec says, how the checkpoint's experts are read.

Logits, paged decode and adapters against transformers / PEFT run with the other families
(``test_families.py``, ``tests/engine/test_engine_families.py``); here what is Mixtral's own: the
checkpoint stores each expert as ``block_sparse_moe.experts.<e>.w1/w2/w3`` (as Mistral AI's
checkpoints do and transformers 5 still saves them), which must reach the MoE layer stacked as
``gate_up (E, 2I, D)`` = [w1; w3] and ``down (E, D, I)`` = w2, and a null ``sliding_window``
means full attention in every layer.
"""

from __future__ import annotations

import pytest
import torch
from family_models import COMMON, build, load_hf, random_tokens
from safetensors import safe_open

from openlora_ray.model.family import FamilySpec
from openlora_ray.model.loader import load_multi_lora_model
from openlora_ray.model.moe import MoeMlp
from openlora_ray.model.support import problems_of

TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return build("mixtral", tmp_path_factory.mktemp("mixtral"))


def test_every_layer_is_sparse_and_windowed_like_mistral():
    from transformers import MixtralConfig

    small = dict(COMMON, num_local_experts=4, num_experts_per_tok=2)
    windowed = FamilySpec.from_config(MixtralConfig(**small, sliding_window=6))
    assert windowed.layer_mlp == ("moe",) * 4
    assert windowed.layer_windowed == (True,) * 4 and windowed.sliding_window == 6
    full = FamilySpec.from_config(MixtralConfig(**small, sliding_window=None))
    assert full.layer_windowed == (False,) * 4 and full.sliding_window is None and full.attn_scale == 16**-0.5


@torch.inference_mode()
def test_the_loader_reads_the_per_expert_checkpoint_as_stacked_experts(mixtral_dir):
    assert problems_of(mixtral_dir) == []
    model = load_multi_lora_model(mixtral_dir, num_slots=1, max_rank=4, dtype=torch.float32)
    with safe_open(str(mixtral_dir / "model.safetensors"), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in stored  # the hub's layout on disk
    for i, layer in enumerate(model.layers):
        assert isinstance(layer.mlp, MoeMlp) and set(layer.groups) == {"qkv", "o"}  # no LoRA inside the MoE
        moe = f"model.layers.{i}.block_sparse_moe"
        torch.testing.assert_close(layer.mlp.router, stored[f"{moe}.gate.weight"], rtol=0, atol=0)
        for e in range(4):
            w1, w2, w3 = (stored[f"{moe}.experts.{e}.w{n}.weight"] for n in (1, 2, 3))
            torch.testing.assert_close(layer.mlp.gate_up[e], torch.cat([w1, w3]), rtol=0, atol=0)
            torch.testing.assert_close(layer.mlp.down[e], w2, rtol=0, atol=0)


@torch.inference_mode()
def test_without_a_window_every_layer_reads_the_whole_prefix(tmp_path, monkeypatch):
    """A null ``sliding_window`` (Mixtral 8x7B's config): sequences short and long, past the
    window the family tests use, equal transformers' full attention."""
    from family_models import FAMILIES

    prefix, kwargs = FAMILIES["mixtral"]
    monkeypatch.setitem(FAMILIES, "mixtral", (prefix, dict(kwargs, sliding_window=None)))
    path = build("mixtral", tmp_path / "full")
    hf = load_hf(path)
    assert hf.config.sliding_window is None
    model = load_multi_lora_model(path, num_slots=1, max_rank=4, dtype=torch.float32)
    for n in (7, 30):
        seq = torch.tensor([random_tokens(n, seed=n)])
        torch.testing.assert_close(model(seq, torch.arange(n)[None]), hf(seq).logits, **TOL)
