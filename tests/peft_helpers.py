"""Building real PEFT adapters for tests (LoRA B made non-zero: PEFT's init would be a no-op)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


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
