"""The batched LoRA op matches its one-row-at-a-time definition."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openlora_ray.lora.ops import (
    BAND_COST_BYTES,
    NO_ADAPTER,
    add_lora_delta,
    lora_delta_reference,
    one_band,
    segment_rows,
    split_band,
    split_ranks,
)

N = NO_ADAPTER
SLOT_PATTERNS = {
    "distinct-consecutive": [3, 0, 4, 2, 1],  # every slot once: stacks read in place
    "distinct-gaps": [4, 0, 2],  # slots 1 and 3 padded: the stacks read in place
    "sparse": [4, 0],  # slots 0 and 4 only: a gather of the slots used
    "pairs": [2, 0, 2, 4, 1, 1, 0, 4],
    "skewed": [3, 3, 3, 3, 3, 3, 0, 1],  # one hot adapter: its rows span several groups
    "with-base-rows": [2, N, 0, 2, 4, N, 1],
    "one-adapter": [1, 1, 1],
    "sorted-padded-tail": [0, 0, 1],  # rows already in group order, but the last group is padded
}


RANKS = [8, 3, 5, 1, 7]  # every slot's rank differs


def delta(
    slots: list[int], dtype: torch.dtype, *, active: tuple[int, ...] = (0, 1, 2), row_bytes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference delta in float32, add_lora_delta's result) for one batch.

    ``active``: the projections the adapters have (the others' A and B are zero, as a slot holds
    them). ``row_bytes``: the batch goes through ``split_band`` with that many bytes per rank row
    (a large value makes every distinct rank its own band); None = one op at the largest rank."""
    gen = torch.Generator().manual_seed(0)
    S, n, R, d_in, splits, L = 5, 3, 8, 32, (32, 16, 16), 4
    a = torch.zeros(S, n, R, d_in)
    b = torch.zeros(S, R, sum(splits))
    for s, r in enumerate(RANKS):  # zero padding beyond each slot's rank, as the slots hold it
        a[s, :, :r] = torch.randn(n, r, d_in, generator=gen)
        b[s, :r] = torch.randn(r, sum(splits), generator=gen)
    start = 0
    for j, width in enumerate(splits):
        if j not in active:
            a[:, j], b[:, :, start : start + width] = 0, 0
        start += width
    a, b = a.to(dtype), b.to(dtype)
    x = torch.randn(len(slots), L, d_in, generator=gen).to(dtype)
    want = lora_delta_reference(x.float(), a.float(), b.float(), torch.tensor(slots), splits)
    rows = [i for i, s in enumerate(slots) if s != N]
    used = [slots[i] for i in rows]
    y = torch.zeros(len(slots), L, sum(splits), dtype=dtype)
    if row_bytes is None:
        seg = segment_rows(rows, used, len(slots), torch.device("cpu"))
        row_t = None if len(rows) == len(slots) else torch.tensor(rows)
        add_lora_delta(y, x, a, b, row_t, seg, max(RANKS[s] for s in used), splits, active)
    else:
        cpu = torch.device("cpu")
        whole = one_band(rows, used, RANKS, len(slots), cpu)
        for band in split_band(whole, rows, used, RANKS, len(slots), cpu, rank_row_bytes=row_bytes):
            add_lora_delta(y, x, a, b, band.rows, band.segments, band.rank, splits, active)
    return want, y.float()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("pattern", list(SLOT_PATTERNS))
def test_add_lora_delta_matches_reference(dtype, tol, pattern):
    want, got = delta(SLOT_PATTERNS[pattern], dtype)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())
    assert want.abs().max() > 1  # a non-trivial delta


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=N, max_value=4), min_size=1, max_size=12).filter(lambda s: any(x != N for x in s)))
def test_any_mix_of_slots_and_base_rows_matches_reference(slots):
    want, got = delta(slots, torch.float32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))


def test_segments_read_consecutive_slots_in_place_and_bound_the_padding():
    dev = torch.device("cpu")
    seg = segment_rows([0, 1, 2, 3, 4], SLOT_PATTERNS["distinct-consecutive"], 5, dev)
    assert seg.slots == slice(0, 5) and seg.size == 1 and seg.keep is not None
    seg = segment_rows(list(range(8)), SLOT_PATTERNS["skewed"], 8, dev)
    # 8 rows over 3 slots: groups of 3; slot 3's six rows take two groups, no slice (3 repeats).
    assert seg.size == 3 and seg.groups == 4 and seg.slots.tolist() == [0, 1, 3, 3]
    assert seg.groups * seg.size <= 2 * 8
    seg = segment_rows([0, 1, 2], [1, 1, 1], 3, dev)
    assert seg.order is None and seg.keep is None and seg.slots == slice(1, 2)
    seg = segment_rows([0, 1, 2], SLOT_PATTERNS["distinct-gaps"], 3, dev)
    assert seg.slots == slice(0, 5) and seg.groups == 5 and seg.keep.tolist() == [4, 0, 2]
    seg = segment_rows([0, 1], SLOT_PATTERNS["sparse"], 2, dev)
    assert seg.slots.tolist() == [0, 4]


@pytest.mark.parametrize("active", [(0, 1, 2), (0, 2), (1,)])
@pytest.mark.parametrize("pattern", list(SLOT_PATTERNS))
def test_bands_of_ranks_and_active_projections_match_reference(pattern, active):
    """Every distinct rank its own band (a huge cost per rank row), and the adapters on some
    projections only (a gather then copies just those)."""
    want, got = delta(SLOT_PATTERNS[pattern], torch.float32, active=active, row_bytes=1 << 40)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert want.abs().max() > 1


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(min_value=N, max_value=4), min_size=1, max_size=12).filter(lambda s: any(x != N for x in s)),
    st.sampled_from([1, 64, 1 << 40]),
)
def test_any_batch_in_bands_matches_reference(slots, row_bytes):
    want, got = delta(slots, torch.float32, row_bytes=row_bytes)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))


def plan_bands(rows, slots, ranks, num_rows, dev, *, rank_row_bytes):
    whole = one_band(rows, slots, ranks, num_rows, dev)
    return split_band(whole, rows, slots, ranks, num_rows, dev, rank_row_bytes=rank_row_bytes)


def test_bands_only_where_the_slots_are_gathered_and_the_saving_pays():
    dev = torch.device("cpu")
    ranks = [8, 64, 8, 64, 16, 8, 8, 8]
    # Slots 0..3 read in place: one band, even at a negligible cost per band.
    (band,) = plan_bands([0, 1, 2, 3], [3, 1, 0, 2], ranks, 4, dev, rank_row_bytes=1 << 40)
    assert band.rank == 64 and band.segments.slots == slice(0, 4)
    # Slots 0, 1 and 7 are gathered: rank 8 apart from rank 64 when a band costs little ...
    bands = plan_bands([0, 1, 2], [0, 1, 7], ranks, 3, dev, rank_row_bytes=1 << 40)
    assert [b.rank for b in bands] == [8, 64] and bands[0].rows.tolist() == [0, 2] and bands[1].rows.tolist() == [1]
    # ... together when a band costs more than the 2 x 56 rank rows it would save.
    (band,) = plan_bands([0, 1, 2], [0, 1, 7], ranks, 3, dev, rank_row_bytes=BAND_COST_BYTES // 200)
    assert band.rank == 64 and band.rows is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=10), st.floats(min_value=0, max_value=500))
def test_split_ranks_is_the_cheapest_split(ranks, band_cost):
    """Against every split of the sorted distinct ranks into consecutive bands."""
    values = sorted(set(ranks))

    def cost(bounds: list[int]) -> float:
        lo, total = 0, 0.0
        for hi in bounds:
            total += band_cost + hi * sum(1 for r in ranks if lo < r <= hi)
            lo = hi
        return total

    best = min(
        cost([v for v, cut in zip(values, cuts + (True,)) if cut])
        for cuts in itertools.product([False, True], repeat=len(values) - 1)
    )
    got = split_ranks(ranks, band_cost)
    assert got[-1] == values[-1] and got == sorted(got)
    assert cost(got) == pytest.approx(best)


def test_rank_slicing_ignores_nothing_that_matters():
    """Slicing to the batch's largest rank gives the same result as the full padded rank."""
    gen = torch.Generator().manual_seed(1)
    a = torch.zeros(2, 1, 16, 8)
    b = torch.zeros(2, 16, 8)
    a[:, :, :4] = torch.randn(2, 1, 4, 8, generator=gen)
    b[:, :4] = torch.randn(2, 4, 8, generator=gen)
    x = torch.randn(2, 3, 8, generator=gen)
    y_sliced, y_full = torch.zeros(2, 3, 8), torch.zeros(2, 3, 8)
    seg = segment_rows([0, 1], [1, 0], 2, torch.device("cpu"))
    add_lora_delta(y_sliced, x, a, b, None, seg, 4, (8,), (0,))
    add_lora_delta(y_full, x, a, b, None, seg, 16, (8,), (0,))
    torch.testing.assert_close(y_sliced, y_full)
