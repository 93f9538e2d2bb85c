"""Shared fixtures: a tiny random Llama saved as a real Hugging Face folder, and PEFT adapters for it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

TINY_CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_CONFIG))
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path, safe_serialization=True)
    return path


def save_peft_adapter(
    base_dir: Path,
    out_dir: Path,
    r: int,
    alpha: float,
    targets: Sequence[str],
    seed: int,
    use_rslora: bool = False,
) -> Path:
    """A real PEFT LoRA adapter with non-zero B (PEFT's init makes B zero: a no-op adapter)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=use_rslora, lora_dropout=0.0)
    peft_model = get_peft_model(base, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="session")
def make_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make_adapter(name, r, alpha, targets, seed, use_rslora=False) -> folder`` (cached per args)."""
    root = tmp_path_factory.mktemp("adapters")
    made: dict[tuple, Path] = {}

    def make(name: str, r: int = 4, alpha: float = 8.0, targets: Sequence[str] = ALL_PROJECTIONS, seed: int = 1, use_rslora: bool = False) -> Path:
        key = (name, r, alpha, tuple(targets), seed, use_rslora)
        if key not in made:
            made[key] = save_peft_adapter(tiny_model_dir, root / name, r, alpha, targets, seed, use_rslora)
        return made[key]

    return make


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real demo model (converted once into the user cache; ~20 s the first time)."""
    from openlora_ray.model.prepare import prepare_demo_model

    return prepare_demo_model()
