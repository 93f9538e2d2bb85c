"""A group of base projections that share one input, fused, with per-slot LoRA stacks.

q/k/v (and gate/up) read the same activations, so their base weights are concatenated into one
GEMM and their LoRA A matrices into one shrink. The buffers are allocated once, at construction:
loading an adapter copies into them and never creates parameters, re-wraps modules or changes a
shape, so nothing downstream (a captured graph, a compiled kernel) has to be rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from openlora_ray.lora.cpu_kernel import CpuLoraKernel, KernelRows, choose_kernel
from openlora_ray.lora.ops import RankBand, add_lora_delta


@dataclass(frozen=True)
class GroupBatch:
    """Which rows of a batch apply LoRA in one projection group, and from which slots."""

    bands: tuple[RankBand, ...]  # the rows bmm computes, grouped by slot, in one or more bands of ranks
    active: tuple[int, ...]  # indices (within the group) of projections any of those slots adapts
    kernel_rows: KernelRows | None = None  # one-token rows the group's CPU kernel computes (``cpu_kernel.py``)


class LoraProjectionGroup(nn.Module):
    """``n`` projections ``in -> out_j`` sharing an input; returns their outputs as a tuple.

    Buffers (S slots, R = max rank):
      weight  (sum_j out_j, in)   frozen base weights, concatenated, read by ``F.linear`` (cuBLAS
                                  and MKL take this layout without a copy); or (in, sum_j out_j)
                                  when ``transposed``, read as ``x @ W``: on one Intel Xeon that ran
                                  decode-sized batches 1.6x faster, on an AMD EPYC it lost, so the
                                  loader measures both on the machine at hand (``model/layout.py``)
      bias    (sum_j out_j,)      base bias if the model has one (Qwen2's q/k/v), else None
      lora_a  (S, n, R, in)       A of each projection, rank zero-padded
      lora_b  (S, R, sum_j out_j) B^T of each projection concatenated along out, scale folded in

    ``kernel``: the compiled CPU op for one-token rows where it beats bmm on this machine, else None.
    """

    def __init__(
        self,
        names: tuple[str, ...],
        weights: list[torch.Tensor],  # each (out_j, in)
        biases: list[torch.Tensor | None],
        num_slots: int,
        max_rank: int,
        *,
        transposed: bool,
    ) -> None:
        super().__init__()
        self.names = names
        self.out_splits = tuple(w.shape[0] for w in weights)
        self.transposed = transposed
        in_features = weights[0].shape[1]
        dtype, device = weights[0].dtype, weights[0].device
        fused = torch.cat(weights, dim=0)  # (sum out, in)
        self.register_buffer("weight", fused.T.contiguous() if transposed else fused)
        has_bias = any(b is not None for b in biases)
        bias = (
            torch.cat([b if b is not None else torch.zeros(w.shape[0], dtype=dtype, device=device) for w, b in zip(weights, biases)])
            if has_bias
            else None
        )
        self.register_buffer("bias", bias)
        shape_a = (num_slots, len(names), max_rank, in_features)
        self.register_buffer("lora_a", torch.zeros(shape_a, dtype=dtype, device=device))
        self.register_buffer("lora_b", torch.zeros(num_slots, max_rank, sum(self.out_splits), dtype=dtype, device=device))
        self.kernel: CpuLoraKernel | None = choose_kernel(device, dtype, in_features, self.out_splits)

    def forward(self, x: torch.Tensor, lora: GroupBatch | None) -> tuple[torch.Tensor, ...]:
        y = x @ self.weight if self.transposed else F.linear(x, self.weight)  # (B, L, sum out)
        if self.bias is not None:
            y += self.bias
        if lora is not None:
            if lora.kernel_rows is not None:
                self.kernel.add(y, x, self.lora_a, self.lora_b, lora.kernel_rows, self.out_splits, lora.active)
            for band in lora.bands:
                add_lora_delta(
                    y, x, self.lora_a, self.lora_b, band.rows, band.segments, band.rank, self.out_splits, lora.active
                )
        return y.split(self.out_splits, dim=-1)

    def clear_slot(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()

    def slot_copies(
        self,
        slot: int,
        mats: dict[str, tuple[torch.Tensor, torch.Tensor]],
        rank: int,
        previous: tuple[int, frozenset[str]],
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """What replacing a slot's contents takes, as (destination view, source) pairs, source None for
        zeros: ``mats[name] = (A (r, in), scaled B^T (r, out))`` for the projections the adapter has, zeros
        everywhere else. The caller runs them (``MultiLoraLlama.write_slot``).

        ``previous`` = (rank, projections) of what the slot held ((0, {}) for an empty slot):
        only what that occupant left non-zero is cleared, and nothing is written twice. A re-load
        from the host tier is then one row-contiguous copy per projection.
        """
        old_rank, old_names = previous
        if not mats and old_names.isdisjoint(self.names):
            return []  # nothing of the adapter's here, and the previous occupant left only zeros
        a_slot, b_slot = self.lora_a[slot], self.lora_b[slot]  # (n, R, in), (R, sum out)
        copies: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        if old_rank > rank:
            copies += [(a_slot[j, rank:old_rank], None) for j in range(len(self.names))]
            copies.append((b_slot[rank:old_rank], None))
        start = 0
        for j, (name, width) in enumerate(zip(self.names, self.out_splits)):
            cols = slice(start, start + width)
            if name in mats:
                a, b_t = mats[name]
                copies += [(a_slot[j, :rank], a), (b_slot[:rank, cols], b_t)]
            elif name in old_names:
                keep = min(rank, old_rank)
                copies += [(a_slot[j, :keep], None), (b_slot[:keep, cols], None)]
            start += width
        return copies

    def bytes_per_slot(self) -> int:
        return self.lora_a[0].nbytes + self.lora_b[0].nbytes
