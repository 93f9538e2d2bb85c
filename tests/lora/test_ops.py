"""The batched LoRA op matches its one-row-at-a-time definition."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openlora_ray.lora.ops import (
    NO_ADAPTER,
    add_lora_delta,
    lora_delta_reference,
    segment_rows,
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


def delta(slots: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference delta in float32, add_lora_delta's result) for one batch; every slot's rank differs."""
    gen = torch.Generator().manual_seed(0)
    S, n, R, d_in, splits, L = 5, 3, 8, 32, (32, 16, 16), 4
    ranks = [8, 3, 5, 1, 7]
    a = torch.zeros(S, n, R, d_in)
    b = torch.zeros(S, R, sum(splits))
    for s, r in enumerate(ranks):  # zero padding beyond each slot's rank, as the slots hold it
        a[s, :, :r] = torch.randn(n, r, d_in, generator=gen)
        b[s, :r] = torch.randn(r, sum(splits), generator=gen)
    a, b = a.to(dtype), b.to(dtype)
    x = torch.randn(len(slots), L, d_in, generator=gen).to(dtype)
    want = lora_delta_reference(x.float(), a.float(), b.float(), torch.tensor(slots), splits)
    rows = [i for i, s in enumerate(slots) if s != N]
    used = [slots[i] for i in rows]
    y = torch.zeros(len(slots), L, sum(splits), dtype=dtype)
    seg = segment_rows(rows, used, len(slots), torch.device("cpu"))
    row_t = None if len(rows) == len(slots) else torch.tensor(rows)
    add_lora_delta(y, x, a, b, row_t, seg, max(ranks[s] for s in used), splits, (0, 1, 2))
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
