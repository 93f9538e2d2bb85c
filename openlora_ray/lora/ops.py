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

``lora_delta_reference`` is exactly that loop. ``add_lora_delta`` must match it without a per-row
loop and without copying each row's A and B (a rank-16 adapter on all seven projections of
SmolLM2-135M is 20 MB: gathering it per row cost a 32-row decode step 600 MB of copies). The
adapted rows are grouped by slot (``segment_rows``, the role of Punica's SGMV segments): V groups
of C rows, C = ceil(rows / distinct slots), a slot with more rows taking several groups and a
short group padded by repeating one of its rows. Per projection one shrink bmm
``(V, C*L, in) @ (V, in, r)`` and one expand bmm ``(V, C*L, r) @ (V, r, w)`` then serve every
adapter at once. When the groups' slots are consecutive (a batch using every slot, say) the
slot stacks are read in place; otherwise only the V slots used are gathered (``index_select``, a
plain block copy: advanced indexing took 6x longer on CPU). The rank is sliced to the largest rank
present, so rank-8 adapters in rank-64 buffers neither copy nor multiply 56 zero rows. B is stored
transposed, ``(S, R, out)``, so each projection's columns are a plain strided view for the expand.

Adapters of different ranks in one batch (``split_band``): one op at the largest rank reads every
slot at that rank, so a batch of rank-8 to rank-64 adapters reads about twice the bytes they hold,
and reading adapter bytes is what a decode step over many distinct adapters spends its extra time
on. When the slots must be gathered anyway (not read in place), the rows are split into *bands* of
ranks, each one op at its own largest rank, as long as a band saves more bytes than its extra
dispatches cost (``BAND_COST_BYTES``). A gather copies only the projections some slot adapts (a
q/v adapter's k rows are zeros that would be copied and multiplied).

On a CPU, a step's one-token rows go instead to a compiled op (``cpu_kernel.py``) where it is built
and faster on the machine at hand: it reads each slot at its own rank with neither padding nor gather.
``add_lora_delta`` remains the op for prefill chunks, CUDA and every other dtype.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

NO_ADAPTER = -1  # slot index of a row that uses the base model only

# What one more band costs, as bytes of slot weights it would have to save to pay for itself: its
# ~8 dispatched ops (gather, shrink, expand, scatter per projection) take tens of microseconds on
# a CPU, the time to read about this much memory.
BAND_COST_BYTES = 512 << 10


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


@dataclass(frozen=True)
class Segments:
    """The adapted rows of a batch laid out as ``groups`` groups of ``size`` rows, one slot per group.

    order  (groups*size,)  batch row at each padded position; None = the batch rows in place
    keep   (K,)            padded position of each adapted row (in the order the rows are given);
                           None = position k holds row k
    slots  (groups,)       slot of each group, or a slice when they are consecutive (read in place)
    mask   (groups, 1, 1)  1 or 0 per group: a 0 group's input is zeroed, so its delta is exactly
                           zero; None = no mask. The static decode step (CUDA graphs) computes every
                           row as a group and masks the rows without an adapter instead of leaving them out
    """

    order: torch.Tensor | None
    keep: torch.Tensor | None
    slots: torch.Tensor | slice
    groups: int
    size: int
    mask: torch.Tensor | None = None


def segment_rows(rows: Sequence[int], slots: Sequence[int], num_batch_rows: int, device: torch.device) -> Segments:
    """Group the adapted ``rows`` (batch indices) by their ``slots``; see the module doc.

    The group size is the mean number of rows per distinct slot, rounded up, so padding at most
    doubles the rows multiplied, however skewed the batch (one hot adapter, many cold ones). When
    every slot makes one group and the slots used cover at least half of the range between the
    lowest and the highest, the slots in between get a group of padding rows too, so the stacks are
    read in place as one slice: reading an unused slot's weights once costs less than gathering the
    used ones (a copy: read, write, read again), the bulk of a decode step over many adapters.
    """
    by_slot: dict[int, list[int]] = {}
    for k, s in enumerate(slots):
        by_slot.setdefault(s, []).append(k)
    size = -(-len(slots) // len(by_slot))
    used = sorted(by_slot)
    span = range(used[0], used[-1] + 1)
    fill = max(map(len, by_slot.values())) <= size and len(span) <= 2 * len(used)
    order: list[int] = []
    keep = [0] * len(slots)
    group_slots: list[int] = []
    for s in span if fill else used:
        ks = by_slot.get(s, [])
        for start in range(0, max(1, len(ks)), size):
            chunk = ks[start : start + size]
            for offset, k in enumerate(chunk):
                keep[k] = len(order) + offset
            pad = rows[chunk[0]] if chunk else rows[0]
            order += [rows[k] for k in chunk] + [pad] * (size - len(chunk))
            group_slots.append(s)
    first = group_slots[0]
    consecutive = group_slots == list(range(first, first + len(group_slots)))
    return Segments(
        order=None if order == list(range(num_batch_rows)) else torch.tensor(order, device=device),
        keep=None if len(order) == len(keep) and keep == list(range(len(keep))) else torch.tensor(keep, device=device),
        slots=slice(first, first + len(group_slots)) if consecutive else torch.tensor(group_slots, device=device),
        groups=len(group_slots),
        size=size,
    )


def add_lora_delta(
    y: torch.Tensor,  # (B, L, out)  base output, updated in place
    x: torch.Tensor,  # (B, L, in)
    a: torch.Tensor,  # (S, n, R, in)
    b: torch.Tensor,  # (S, R, out)
    rows: torch.Tensor | None,  # (K,) rows that have an adapter; None = all B rows
    seg: Segments,  # those rows grouped by slot (segment_rows)
    rank: int,  # largest rank among their slots (<= R)
    out_splits: tuple[int, ...],
    active: tuple[int, ...],  # projections any of those slots adapts; the others' B is all zero
) -> None:
    """``y[rows] += lora_delta(x[rows])``: one shrink and one expand bmm per adapted projection."""
    length, d_in = x.shape[1], x.shape[2]
    v, c = seg.groups, seg.size
    xs = (x if seg.order is None else x.index_select(0, seg.order)).reshape(v, c * length, d_in)  # (V, C*L, in)
    if seg.mask is not None:
        xs = xs * seg.mask
    in_place = isinstance(seg.slots, slice)
    whole = in_place or len(active) == len(out_splits)  # else gather the active projections only
    if in_place:
        a_g, b_g = a[seg.slots, :, :rank], b[seg.slots, :rank]  # (V, n, r, in), (V, r, out): views
    elif whole:
        a_g, b_g = a[:, :, :rank].index_select(0, seg.slots), b[:, :rank].index_select(0, seg.slots)
    offsets = [sum(out_splits[:j]) for j in range(len(out_splits))]
    for j in active:
        cols = slice(offsets[j], offsets[j] + out_splits[j])
        if whole:
            a_j, b_j = a_g[:, j], b_g[:, :, cols]  # (V, r, in), (V, r, w)
        else:
            a_j, b_j = a[:, j, :rank].index_select(0, seg.slots), b[:, :rank, cols].index_select(0, seg.slots)
        shrunk = torch.bmm(xs, a_j.transpose(1, 2))  # (V, C*L, r)
        delta = torch.bmm(shrunk, b_j).view(v * c, length, -1)  # (V*C, L, w)
        if seg.keep is not None:
            delta = delta.index_select(0, seg.keep)  # (K, L, w), in the order of rows
        if rows is None:
            y[..., cols] += delta
        else:
            y[..., cols].index_add_(0, rows, delta)


@dataclass(frozen=True)
class RankBand:
    """Rows of one projection group computed by one op (``add_lora_delta``) at one rank."""

    rows: torch.Tensor | None  # (K,) batch rows; None = every row of the batch
    segments: Segments  # those rows grouped by slot
    rank: int  # largest rank among their slots


def split_ranks(ranks: Sequence[int], band_cost: float) -> list[int]:
    """The upper ranks of the bands that minimise the rank rows read plus ``band_cost`` per band.

    ``ranks`` has one entry per distinct slot; a band reads each of its slots at the band's largest
    rank. Bands cover consecutive ranks (an optimal split never interleaves them), so this is a
    dynamic programme over the sorted distinct ranks: ``best[i]`` covers the ``i`` smallest.
    """
    values, count = sorted(set(ranks)), Counter(ranks)
    best, cut = [0.0] + [float("inf")] * len(values), [0] * (len(values) + 1)
    for i in range(1, len(values) + 1):
        slots = 0
        for j in range(i - 1, -1, -1):  # the band holds values[j:i]
            slots += count[values[j]]
            cost = best[j] + band_cost + slots * values[i - 1]
            if cost < best[i]:
                best[i], cut[i] = cost, j
    bounds, i = [], len(values)
    while i:
        bounds.append(values[i - 1])
        i = cut[i]
    return bounds[::-1]


def one_band(
    rows: Sequence[int],
    slots: Sequence[int],  # slot of each of ``rows``
    slot_rank: Sequence[int],  # rank held by every slot
    num_batch_rows: int,
    device: torch.device,
) -> RankBand:
    """The adapted ``rows`` as one band, at the largest rank among their slots."""
    seg = segment_rows(rows, slots, num_batch_rows, device)
    row_t = None if len(rows) == num_batch_rows else torch.tensor(rows, device=device)
    return RankBand(row_t, seg, max(slot_rank[s] for s in slots))


def split_band(
    whole: RankBand,
    rows: Sequence[int],
    slots: Sequence[int],
    slot_rank: Sequence[int],
    num_batch_rows: int,
    device: torch.device,
    *,
    rank_row_bytes: int,  # bytes one rank row of one slot holds in the projections the op computes
) -> tuple[RankBand, ...]:
    """``whole`` (``one_band`` of the same rows) as bands of ranks for ``add_lora_delta`` (see the
    module doc); ``(whole,)`` when its slots are read in place (splitting would turn a read into
    gathers) or when splitting saves less than ``BAND_COST_BYTES`` per extra band."""
    if isinstance(whole.segments.slots, slice):
        return (whole,)
    bounds = split_ranks([slot_rank[s] for s in set(slots)], BAND_COST_BYTES / rank_row_bytes)
    if len(bounds) == 1:
        return (whole,)
    members: dict[int, list[int]] = {}
    for k, s in enumerate(slots):
        members.setdefault(next(b for b in bounds if slot_rank[s] <= b), []).append(k)
    return tuple(
        one_band([rows[k] for k in ks], [slots[k] for k in ks], slot_rank, num_batch_rows, device)
        for ks in (members[b] for b in bounds if b in members)
    )
