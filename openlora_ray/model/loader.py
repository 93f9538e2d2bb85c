"""Load a Hugging Face causal LM folder (safetensors) into a ``MultiLoraLlama``."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from openlora_ray.errors import OpenLoraError
from openlora_ray.model.layout import choose_transposed
from openlora_ray.model.llama import MultiLoraLlama
from openlora_ray.model.support import check_supported

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 (or float16) on CUDA, float32 on CPU.

    On the 2-core AVX-512 BF16 development machine with torch 2.13's CPU build, bfloat16 GEMMs of
    this model's shapes were 1.7x slower than float32 at 512 rows and no faster at 16 rows, and
    the whole decode step was 8% slower (BENCHMARKS.md), so float32 is the CPU default.
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return DTYPES[name]
    except KeyError:
        raise OpenLoraError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}") from None


def load_hf_model(
    path: str | Path, dtype: torch.dtype, device: torch.device | str = "cpu", max_seq_len: int | None = None
) -> torch.nn.Module:
    """A frozen ``*ForCausalLM`` from a local folder; never reaches out to a model hub.

    Refuses (``UnsupportedModelError``, before reading any weight) a folder the engine cannot
    serve, or whose positions do not reach ``max_seq_len``: see ``model/support.py``.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    check_supported(path, max_seq_len)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, use_safetensors=True)
    return model.to(device).eval().requires_grad_(False)


def load_multi_lora_model(
    path: str | Path,
    num_slots: int,
    max_rank: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    max_seq_len: int | None = None,
) -> MultiLoraLlama:
    hf = load_hf_model(path, dtype, device, max_seq_len)
    # gate_up, the largest fused projection, decides the layout of all of them
    transposed = choose_transposed(torch.device(device), dtype, hf.config.hidden_size, 2 * hf.config.intermediate_size)
    model = MultiLoraLlama(hf, num_slots, max_rank, transposed=transposed)
    log.info("loaded %s (%s, %s) with %d LoRA slots of rank <= %d (%.1f MiB of slots)", path, dtype, device, num_slots, max_rank, model.bytes_per_slot() * num_slots / 2**20)
    return model.eval().requires_grad_(False)
