"""Qwen3-MoE through the one forward and the engine against transformers' Qwen3MoeForCausalLM (and PEFT).

The tiny random model (tests/conftest.py) has sparse layers 0, 1 and 3 and a dense layer 2
(``mlp_only_layers``); its routers are random so that tokens spread over the 8 experts.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GenerationConfig

from openlora_ray.engine.config import EngineConfig
from openlora_ray.engine.request import SamplingParams
from openlora_ray.engine.runner import DecodeRow, ModelRunner
from openlora_ray.lora.ops import NO_ADAPTER
from openlora_ray.lora.weights import load_lora_weights
from openlora_ray.model.llama import MultiLoraLlama
from openlora_ray.model.moe import MoeMlp

TOL = {"rtol": 1e-4, "atol": 1e-4}


def load_hf(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def save_adapter(base_dir, out, seed: int, **lora):
    """A real PEFT adapter with non-zero B."""
    model = get_peft_model(load_hf(base_dir), LoraConfig(lora_dropout=0.0, **lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(out, safe_serialization=True)
    return out


def dense_layer_adapter(base_dir, out, r: int, alpha: float):
    """q/v of every layer and the dense layer's gate/up/down, in PEFT's file format, and the merged
    reference. Made by hand: PEFT 0.21 turns gate/up/down_proj targets on a transformers 5 MoE into
    per-expert ``target_parameters`` (refused), so it cannot write this adapter itself."""
    ref = load_hf(base_dir)
    g = torch.Generator().manual_seed(7)
    tensors = {}
    targets = [(i, "self_attn", p) for i in range(4) for p in ("q_proj", "v_proj")] + [(2, "mlp", p) for p in ("gate_proj", "up_proj", "down_proj")]
    with torch.no_grad():
        for layer, owner, proj in targets:
            linear = getattr(getattr(ref.model.layers[layer], owner), proj)
            a = torch.randn(r, linear.in_features, generator=g) * 0.2
            b = torch.randn(linear.out_features, r, generator=g) * 0.2
            key = f"base_model.model.model.layers.{layer}.{owner}.{proj}"
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
            linear.weight += alpha / r * b @ a
    out.mkdir()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out, ref


@torch.inference_mode()
def test_the_layers_are_sparse_where_transformers_puts_experts(tiny_qwen3_moe_dir):
    model = MultiLoraLlama(load_hf(tiny_qwen3_moe_dir), num_slots=1, max_rank=4)
    assert [isinstance(layer.mlp, MoeMlp) for layer in model.layers] == [True, True, False, True]
    assert set(model.layers[2].groups) == {"qkv", "o", "gate_up", "down"} and set(model.layers[0].groups) == {"qkv", "o"}


@torch.inference_mode()
def test_paged_prefill_and_decode_with_adapters_equal_transformers_and_peft(tiny_qwen3_moe_dir, tmp_path):
    path = tiny_qwen3_moe_dir
    dense, merged = dense_layer_adapter(path, tmp_path / "a", r=8, alpha=5.0)
    adapters = {0: dense, 1: save_adapter(path, tmp_path / "b", seed=2, r=2, lora_alpha=7.0, target_modules=["q_proj", "o_proj"])}
    model = MultiLoraLlama(load_hf(path), num_slots=2, max_rank=8).eval()
    for slot, folder in adapters.items():
        model.write_slot(slot, load_lora_weights(str(slot), folder, model.dims, 8, torch.float32))
    assert {"gate_proj", "down_proj", "q_proj"} <= model._slot_projs[0]
    refs = {0: merged, 1: PeftModel.from_pretrained(load_hf(path), adapters[1]).eval(), NO_ADAPTER: load_hf(path)}

    total, prompts, slots = 17, [9, 4, 12], [0, NO_ADAPTER, 1]
    seqs = [tokens(total, seed=10 + i) for i in range(3)]
    want = [refs[s](torch.tensor([seq])).logits[0] for s, seq in zip(slots, seqs)]
    runner = ModelRunner(model, num_blocks=24, block_size=4)
    tables = [list(range(6 * i, 6 * i + 6)) for i in range(3)]
    for i, n in enumerate(prompts):
        for lo in range(0, n, 5):  # chunked prefill
            hi = min(n, lo + 5)
            logits = runner.prefill(seqs[i][lo:hi], start=lo, blocks=tables[i], slot=slots[i])
            torch.testing.assert_close(logits, want[i][hi - 1], **TOL)
    pos = list(prompts)
    while min(pos) < total:
        live = [i for i in range(3) if pos[i] < total]
        logits = runner.decode([DecodeRow(seqs[i][pos[i]], pos[i], tables[i], slots[i]) for i in live])
        for r, i in enumerate(live):
            torch.testing.assert_close(logits[r], want[i][pos[i]], **TOL)
            assert logits[r].argmax() == want[i][pos[i]].argmax()
            pos[i] += 1


async def test_engine_greedy_equals_generate(engine_factory, tiny_qwen3_moe_dir):
    """Three requests at once: prefill chunks and decode rows of different lengths share steps."""
    hf = load_hf(tiny_qwen3_moe_dir)
    engine = engine_factory(EngineConfig(model_path=tiny_qwen3_moe_dir, max_seq_len=64, kv_block_size=4, prefill_chunk=8, num_kv_blocks=64))
    prompts = [tokens(n, seed=30 + n) for n in (3, 11, 20)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    async def run(prompt):
        got, last = [], None
        async for out in engine.generate(engine.make_request(prompt, params=params)):
            got += out.token_ids
            last = out
        return got, last.finish_reason

    cfg = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=[], pad_token_id=0)
    for prompt, (got, reason) in zip(prompts, await asyncio.gather(*(run(p) for p in prompts))):
        want = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), generation_config=cfg)
        assert got == want[0, len(prompt):].tolist() and reason == "length"


@pytest.fixture
def engine_factory():
    from openlora_ray.engine.engine import Engine

    engines = []

    def make(config):
        engines.append(Engine(config))
        return engines[-1]

    yield make
    for engine in engines:
        engine.shutdown(drain_timeout_s=1)
