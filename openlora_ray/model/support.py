"""Whether the engine can serve a model folder, decided from its JSON files alone.

Read before any weight is loaded (and without torch), so that ``serve`` and ``model info`` can say
at start-up *why* a folder cannot be served and what to do instead, rather than a replica failing
on its first request. Three things are refused, each with the fix in the message:

- a model type outside the supported table (the families the spec forward computes exactly);
- a ``quantization_config``: the forward multiplies plain float weights, and loading e.g. GPTQ or
  AWQ tensors through transformers would either fail obscurely or dequantise silently;
- a ``max_seq_len`` beyond what the model's positions allow (see :func:`position_limit`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openlora_ray.errors import OpenLoraError

# model_type -> family, as the README's table names them: the families model/family.py has a spec
# for (the one forward computes them; qwen3_moe's sparse layers and mixtral's run model/moe.py).
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "Llama 2/3.x, SmolLM",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "qwen3_moe": "Qwen3-MoE",
    "mixtral": "Mixtral",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3 (text)",
    "phi3": "Phi-3",
}


class UnsupportedModelError(OpenLoraError):
    """The folder holds a model this engine cannot serve as configured; the message says the fix."""


@dataclass(frozen=True)
class PositionLimit:
    """The longest sequence (prompt + completion) the model's positions allow, and why."""

    tokens: int | None  # None: the config states no limit
    reason: str


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / "config.json"
    if not file.is_file():
        raise UnsupportedModelError(f"{path} is not a Hugging Face model folder (no config.json)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UnsupportedModelError(f"{file} is not valid JSON: {e}") from e


def _rope_dicts(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """RoPE settings as ``config.json`` writes them: transformers 4's ``rope_scaling``, or 5's
    ``rope_parameters`` (one dict, or one per layer type as Gemma 3 saves it)."""
    found = []
    for key in ("rope_scaling", "rope_parameters"):
        value = cfg.get(key)
        if isinstance(value, dict):
            nested = [v for v in value.values() if isinstance(v, dict)]
            found += nested if nested else [value]
    return found


def position_limit(cfg: dict[str, Any]) -> PositionLimit:
    """``max_position_embeddings``, extended only where the RoPE scaling is meant to extend it.

    - ``yarn``: ``original_max_position_embeddings x factor`` (Qwen2.5's and Qwen3's long-context
      setting writes ``factor: 4, original_max_position_embeddings: 32768``); vLLM derives its
      maximum length the same way (``_get_and_verify_max_len``).
    - ``linear``, ``llama3``: the config's ``max_position_embeddings`` already names the extended
      length (Llama 3.1's 131072, Gemma 3's 131072 with linear x8).
    - ``longrope`` (Phi-3 128k): ``original_max_position_embeddings``. transformers switches from
      the short to the long factors when the longest position *in the batch* passes it; the engine
      keeps the short factors per row (``model/family.py``), so it is exact only up to there.
    - ``dynamic`` (NTK): not extended. transformers recomputes the frequencies from the longest
      position *in the batch*, so past ``max_position_embeddings`` a row's output would depend on
      which other rows share its batch; within it, dynamic equals the default RoPE.
    """
    base = cfg.get("max_position_embeddings")
    if base is None:
        return PositionLimit(None, "the config states no max_position_embeddings")
    limit, reason = base, f"max_position_embeddings = {base}"
    for rope in _rope_dicts(cfg):
        kind = rope.get("rope_type") or rope.get("type") or "default"
        if kind == "longrope":
            original = rope.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
            if original and original < limit:
                limit = original
                reason = (f"longrope RoPE: exact up to original_max_position_embeddings {original} "
                          "(transformers switches factors by the batch's longest row past it)")
            continue
        if kind == "yarn" and rope.get("factor"):
            original = rope.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings") or base
            extended = int(original * rope["factor"])
            if extended > limit:
                limit = extended
                reason = f"yarn RoPE scaling: original_max_position_embeddings {original} x factor {rope['factor']}"
    return PositionLimit(limit, reason)


def check_supported(path: str | Path, max_seq_len: int | None = None) -> dict[str, Any]:
    """Raise ``UnsupportedModelError`` naming the first problem and its fix; return the config."""
    problems = problems_of(path, max_seq_len)
    if problems:
        raise UnsupportedModelError(f"{Path(path)} cannot be served: {problems[0]}")
    return read_config(path)


def problems_of(path: str | Path, max_seq_len: int | None = None) -> list[str]:
    """Every reason the folder cannot be served (empty: it can), each naming its fix."""
    cfg = read_config(path)
    problems = []
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = ", ".join(cfg.get("architectures") or []) or "no architectures listed"
        problems.append(
            f"model type {model_type!r} ({arch}) is not supported; supported types: "
            f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))} (README: Supported models); serve a model of one of them"
        )
    quant = cfg.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
        problems.append(
            f"the checkpoint is quantized (quantization_config, quant_method {method!r}), which is not supported "
            "yet; serve the unquantized float32/bfloat16/float16 safetensors of the model (or dequantize it once "
            "with transformers and save_pretrained, as `openlora-ray model prepare` does for GGUF files)"
        )
    if max_seq_len is not None:
        limit = position_limit(cfg)
        if limit.tokens is not None and max_seq_len > limit.tokens:
            problems.append(
                f"max_seq_len {max_seq_len} is beyond the {limit.tokens} positions the model allows "
                f"({limit.reason}); set the engine's max_seq_len to at most {limit.tokens}"
            )
    return problems
