"""Load a validated PEFT adapter into host memory, ready to copy into a slot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from openlora_ray.adapter_format import WEIGHTS_FILE, BaseModelDims, parse_weight_key, validate_adapter_dir
from openlora_ray.errors import InvalidAdapterError


@dataclass(frozen=True)
class LoraWeights:
    """One adapter's matrices, unpadded, with PEFT's scale already folded into B.

    ``modules[(layer, proj)] = (A (r, in), B (out, r) * scale)``. Folding the scale at load time
    means the forward pass never multiplies by it, and slots need no per-slot scale vector.
    """

    adapter_id: str
    rank: int
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        """Bytes held, at the adapter's own rank: what the host tier's budget counts."""
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())

    @property
    def projections(self) -> frozenset[str]:
        return frozenset(p for _, p in self.modules)


def load_lora_weights(
    adapter_id: str,
    adapter_dir: str | Path,
    dims: BaseModelDims,
    max_rank: int,
    dtype: torch.dtype,
) -> LoraWeights:
    """Validate (header first, values after) and load an adapter folder onto the CPU.

    Shapes, rank and features are checked from the safetensors header before any tensor is read;
    non-finite values are checked after, before the weights can reach a slot.
    """
    spec = validate_adapter_dir(adapter_id, adapter_dir, dims, max_rank)
    tensors = load_file(Path(adapter_dir) / WEIGHTS_FILE, device="cpu")
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        layer, proj, ab = parse_weight_key(key)  # every key parses: validate_adapter_dir checked
        if not torch.isfinite(tensor).all():
            raise InvalidAdapterError(adapter_id, f"layer {layer} {proj} lora_{ab} holds NaN or infinite values")
        pairs.setdefault((layer, proj), {})[ab] = tensor.float()
    scale = spec.config.scale
    modules = {k: (p["A"].to(dtype), (p["B"] * scale).to(dtype)) for k, p in pairs.items()}
    return LoraWeights(adapter_id, spec.rank, modules)
