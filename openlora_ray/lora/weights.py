"""Load a validated PEFT adapter into host memory, ready to copy into a slot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
    """An adapter read off the model's thread: validated, in float32, scale folded into B^T.

    No torch arithmetic happens in the reading thread, on purpose. Element-wise torch work on
    tensors this size makes torch start an OpenMP thread team in the calling thread, and libgomp
    keeps that team for the thread's life; once a process has more OpenMP threads than cores, every
    team stops spin-waiting and each parallel op pays a futex wake-up. Measured here: the engine
    loop ran prefill 1.5x and decode 1.2x slower while an idle worker thread held such a team. So
    worker threads read (``read_lora``), test the values for NaN/Inf on their raw bits and convert
    them (widen to float32, fold the scale, transpose B) with numpy, single-threaded, and the thread
    that runs the model only casts them to its dtype when that is not float32 (``to_weights``):
    the conversion in torch took 3% of the engine loop's time serving 2,000 adapters.
    """

    adapter_id: str
    rank: int
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # as ``LoraWeights.modules``, float32
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
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, tensor in tensors.items():
        layer, proj, ab = parse_weight_key(key)
        raw = tensor.view(torch.uint8).numpy()  # the stored bits: a view, no arithmetic
        dtype = _SAFETENSORS_DTYPES[tensor.dtype]
        if count_nonfinite(raw, dtype):
            raise InvalidAdapterError(adapter_id, f"layer {layer} {proj} lora_{ab} holds NaN or infinite values")
        pairs.setdefault((layer, proj), {})[ab] = _as_float32(raw, dtype).reshape(tensor.shape)
    scale = np.float32(spec.config.scale)
    modules = {
        k: (torch.from_numpy(p["A"]), torch.from_numpy(np.ascontiguousarray((p["B"] * scale).T)))  # (r, in), (r, out)
        for k, p in pairs.items()
    }
    return RawLora(adapter_id, spec.rank, modules, digest or folder_digest(adapter_dir))


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _as_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """The bytes of a tensor of safetensors ``dtype`` as float32 values (exact: every value widens)."""
    if dtype == "F32":
        return raw.view(np.float32)
    if dtype == "F16":
        return raw.view(np.float16).astype(np.float32)
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)  # bfloat16: the high half of a float32


def to_weights(raw: RawLora, dtype: torch.dtype) -> LoraWeights:
    """The adapter in the model's dtype: a cast on the model's thread, or nothing for float32."""
    modules = raw.modules
    if dtype != torch.float32:
        modules = {k: (a.to(dtype), b.to(dtype)) for k, (a, b) in modules.items()}
    return LoraWeights(raw.adapter_id, raw.rank, modules, raw.digest)


def load_lora_weights(adapter_id: str, adapter_dir: str | Path, dims: BaseModelDims, max_rank: int, dtype: torch.dtype) -> LoraWeights:
    """Validate (header first, values after) and load an adapter folder onto the CPU, in one call."""
    return to_weights(read_lora(adapter_id, adapter_dir, dims, max_rank), dtype)
