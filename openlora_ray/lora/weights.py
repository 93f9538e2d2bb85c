"""Load a validated PEFT adapter into host memory, ready to copy into a slot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from openlora_ray.adapter_digest import folder_digest
from openlora_ray.adapter_format import (
    WEIGHTS_FILE,
    BaseModelDims,
    count_nonfinite,
    parse_weight_key,
    validate_adapter_dir,
)
from openlora_ray.errors import InvalidAdapterError


@dataclass(frozen=True)
class LoraWeights:
    """One adapter's matrices, unpadded, with PEFT's scale already folded into B.

    ``modules[(layer, proj)] = (A (r, in), B^T * scale (r, out))``. Folding the scale at load time
    means the forward pass never multiplies by it, and slots need no per-slot scale vector. B is
    kept transposed, as the slots hold it, so a re-load from this host tier is a row-contiguous
    copy: copying B^T out of PEFT's (out, r) layout took 3.5 ms per rank-16 SmolLM2 adapter, from
    (r, out) 1.0 ms.
    """

    adapter_id: str
    rank: int
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    digest: str  # content digest of the files these weights came from: the KV identity they compute under

    @property
    def nbytes(self) -> int:
        """Bytes held, at the adapter's own rank: what the host tier's budget counts."""
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())

    @property
    def projections(self) -> frozenset[str]:
        return frozenset(p for _, p in self.modules)


@dataclass(frozen=True)
class RawLora:
    """An adapter as read from disk: validated header, tensors as stored, no arithmetic yet.

    Reading and converting are split on purpose. Element-wise work on tensors this size makes
    torch start an OpenMP thread team in the calling thread, and libgomp keeps that team for the
    thread's life; once a process has more OpenMP threads than cores, every team stops
    spin-waiting and each parallel op pays a futex wake-up. Measured here: the engine loop ran
    prefill 1.5x and decode 1.2x slower while an idle worker thread held such a team. So worker
    threads only read (``read_lora``) and test the values for NaN/Inf on their raw bits with numpy
    (single-threaded; ``torch.isfinite`` per tensor was most of a load's time on the model's thread),
    and the thread that runs the model converts (``to_weights``).
    """

    adapter_id: str
    rank: int
    scale: float
    tensors: dict[tuple[int, str, str], torch.Tensor]  # (layer, proj, "A" | "B") -> as stored
    digest: str  # see ``LoraWeights.digest``


def read_lora(
    adapter_id: str, adapter_dir: str | Path, dims: BaseModelDims, max_rank: int, digest: str | None = None
) -> RawLora:
    """Validate an adapter folder and read its tensors (I/O only: safe off the model's thread).

    Shapes, rank and features are checked from the safetensors header before any tensor is read.
    ``digest`` is the folder's content digest when the caller knows it (the store's manifest);
    otherwise the files are hashed here.
    """
    spec = validate_adapter_dir(adapter_id, adapter_dir, dims, max_rank)
    tensors = load_file(Path(adapter_dir) / WEIGHTS_FILE, device="cpu")
    # Every key parses and every dtype is one of these three: validate_adapter_dir checked them.
    parsed = {parse_weight_key(k): t for k, t in tensors.items()}
    for (layer, proj, ab), tensor in parsed.items():
        raw = tensor.view(torch.uint8).numpy()  # the stored bits: a view, no arithmetic
        if count_nonfinite(raw, _SAFETENSORS_DTYPES[tensor.dtype]):
            raise InvalidAdapterError(adapter_id, f"layer {layer} {proj} lora_{ab} holds NaN or infinite values")
    return RawLora(adapter_id, spec.rank, spec.config.scale, parsed, digest or folder_digest(adapter_dir))


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def to_weights(raw: RawLora, dtype: torch.dtype) -> LoraWeights:
    """Fold the scale into B and lay B out transposed: the step that must run on the model's thread."""
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for (layer, proj, ab), tensor in raw.tensors.items():
        pairs.setdefault((layer, proj), {})[ab] = tensor.float()
    modules = {k: (p["A"].to(dtype), (p["B"] * raw.scale).T.to(dtype).contiguous()) for k, p in pairs.items()}
    return LoraWeights(raw.adapter_id, raw.rank, modules, raw.digest)


def load_lora_weights(adapter_id: str, adapter_dir: str | Path, dims: BaseModelDims, max_rank: int, dtype: torch.dtype) -> LoraWeights:
    """Validate (header first, values after) and load an adapter folder onto the CPU, in one call."""
    return to_weights(read_lora(adapter_id, adapter_dir, dims, max_rank), dtype)
