"""The LoRA tensor op, stated as reference PyTorch and implemented without a per-row loop.

Semantics (Punica's "BGMV" generalised to a row-batched prefill; Chen et al., 2023)::

    # x      (B, L, in)        input rows, L tokens each
    # a      (S, n, R, in)     per-slot A of the n projections that share the input, rank-padded to R
    # b      (S, R, out)       per-slot B^T of the n projections concatenated along out, scale folded in
    # slots  (B,)              slot of each row; NO_ADAPTER (-1) means "base weights only"
    # y      (B, L, out)       y[i] += sum_j x[i] @ a[s, j].T @ b[s, out_j].T   for s = slots[i] >= 0
    for i in range(B):
        s = slots[i]
        if s == NO_ADAPTER:
            continue
        for j, cols in enumerate(out_splits):            # cols: slice of out for projection j
            y[i, :, cols] += x[i] @ a[s, j].T @ b[s, :, cols]

``lora_delta_reference`` is exactly that loop. ``add_lora_delta`` must match it; it gathers the
rows' A and B once (``index_select``, a plain block copy: advanced indexing took 6x longer on
CPU) and runs one shrink bmm plus one expand bmm per projection, whatever the number of distinct
adapters in the batch. It slices the rank to the largest rank present before gathering, so
rank-8 adapters in rank-64 buffers neither copy nor multiply 56 zero rows. B is stored
transposed, ``(S, R, out)``, so a rank prefix of a slot is one contiguous block and each
projection's columns are a plain strided view for the expand bmm.
"""

from __future__ import annotations

import torch

NO_ADAPTER = -1  # slot index of a row that uses the base model only


def lora_delta_reference(
    x: torch.Tensor,  # (B, L, in)
    a: torch.Tensor,  # (S, n, R, in)
    b: torch.Tensor,  # (S, R, out)
    slots: torch.Tensor,  # (B,)
    out_splits: tuple[int, ...],
) -> torch.Tensor:  # (B, L, out)
    """The op's definition, one row and one projection at a time. For tests only."""
    y = torch.zeros(*x.shape[:2], b.shape[2], dtype=x.dtype, device=x.device)
    for i, s in enumerate(slots.tolist()):
        if s == NO_ADAPTER:
            continue
        start = 0
        for j, width in enumerate(out_splits):
            cols = slice(start, start + width)
            y[i, :, cols] += x[i] @ a[s, j].T @ b[s, :, cols]
            start += width
    return y


def add_lora_delta(
    y: torch.Tensor,  # (B, L, out)  base output, updated in place
    x: torch.Tensor,  # (B, L, in)
    a: torch.Tensor,  # (S, n, R, in)
    b: torch.Tensor,  # (S, R, out)
    rows: torch.Tensor | None,  # (K,) rows that have an adapter; None = all B rows
    slots: torch.Tensor,  # (K,) slot of each of those rows, all >= 0
    rank: int,  # largest rank among those slots (<= R)
    out_splits: tuple[int, ...],
    active: tuple[int, ...],  # projections any of those slots adapts; the others' B is all zero
) -> None:
    """``y[rows] += lora_delta(x[rows])``: one gather of A and B, one shrink bmm, one expand bmm per projection."""
    n = a.shape[1]
    xs = x if rows is None else x.index_select(0, rows)  # (K, L, in)
    k = xs.shape[0]
    a_rows = a[:, :, :rank].index_select(0, slots).view(k, n * rank, a.shape[-1])  # (K, n*r, in)
    shrunk = torch.bmm(xs, a_rows.transpose(1, 2))  # (K, L, n*r)
    b_rows = b[:, :rank].index_select(0, slots)  # (K, r, out)
    offsets = [sum(out_splits[:j]) for j in range(n)]
    for j in active:
        cols = slice(offsets[j], offsets[j] + out_splits[j])
        delta = torch.bmm(shrunk[..., j * rank : (j + 1) * rank], b_rows[..., cols])  # (K, L, w)
        if rows is None:
            y[..., cols] += delta
        else:
            y[..., cols].index_add_(0, rows, delta)
