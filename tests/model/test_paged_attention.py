"""The paged attention paths against their one-row-at-a-time definition."""

from __future__ import annotations

import random

import pytest
import torch

from openlora_ray.model.paged_attention import (
    PrefillLayout,
    build_decode_layout,
    decode_attention,
    paged_attention_reference,
    prefill_attention,
)

KVH, REP, HD, BS = 2, 3, 8, 4


def pools(num_blocks: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_blocks, KVH, HD, BS, generator=gen), torch.randn(num_blocks, KVH, BS, HD, generator=gen)


def random_tables(lengths: list[int], num_blocks: int, rng: random.Random, shared: int = 0) -> list[list[int]]:
    """Disjoint random block tables, the first ``shared`` blocks common to every row."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    common = [free.pop() for _ in range(shared)]
    return [common + [free.pop() for _ in range(-(-n // BS) - shared)] for n in lengths]


@pytest.mark.parametrize("layout_kind", ["in-place", "scattered", "shared-prefix"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_attention_matches_the_reference(layout_kind, seed):
    rng = random.Random(seed)
    lengths = [rng.randint(9, 40) for _ in range(5)] + [1, 4, 5]  # very different lengths, block edges
    if layout_kind == "in-place":  # consecutive blocks, a few unused ones in between
        tables, nxt = [], 3
        for n in lengths:
            tables.append(list(range(nxt, nxt + -(-n // BS))))
            nxt += -(-n // BS) + rng.randint(0, 1)
        num_blocks = nxt + 2
    else:
        shared = 2 if layout_kind == "shared-prefix" else 0
        lengths = [max(n, shared * BS + 1) for n in lengths]
        num_blocks = 200
        tables = random_tables(lengths, num_blocks, rng, shared)
    k, v = pools(num_blocks, seed)
    q = torch.randn(len(lengths), KVH * REP, HD, generator=torch.Generator().manual_seed(seed + 10))
    layout = build_decode_layout(tables, lengths, BS, torch.device("cpu"))
    assert isinstance(layout.blocks, slice) == (layout_kind == "in-place")
    got = decode_attention(q, k, v, layout, scale=0.3)
    want = paged_attention_reference(q[:, :, None], k, v, tables, [n - 1 for n in lengths], scale=0.3)[:, :, 0]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("start,length", [(0, 7), (8, 5), (13, 1), (3, 12)])
def test_prefill_attention_matches_the_reference(start, length):
    rng = random.Random(start * 31 + length)
    tables = random_tables([start + length], 64, rng)
    k, v = pools(64, start)
    q = torch.randn(KVH * REP, length, HD, generator=torch.Generator().manual_seed(5))
    layout = PrefillLayout(torch.tensor(tables[0]), start)
    got = prefill_attention(q, k, v, layout, scale=0.25)
    want = paged_attention_reference(q[None], k, v, tables, [start], scale=0.25)[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,softcap", [(5, None), (8, None), (1, None), (6, 2.0), (None, 1.5)])
@pytest.mark.parametrize("layout_kind", ["in-place", "scattered"])
def test_decode_attention_with_a_sliding_window_or_soft_cap_matches_the_reference(layout_kind, window, softcap):
    """A windowed row reads only its last ``window`` positions (blocks before them are not paired)."""
    rng = random.Random(7)
    lengths = [1, 4, 5, 9, 23, 40]
    if layout_kind == "in-place":
        tables, nxt = [], 0
        for n in lengths:
            tables.append(list(range(nxt, nxt + -(-n // BS))))
            nxt += -(-n // BS)
        num_blocks = nxt
    else:
        num_blocks = 100
        tables = random_tables(lengths, num_blocks, rng)
    k, v = pools(num_blocks, 3)
    q = torch.randn(len(lengths), KVH * REP, HD, generator=torch.Generator().manual_seed(4)) * 3
    layout = build_decode_layout(tables, lengths, BS, torch.device("cpu"), window=window)
    if window is not None:  # only blocks holding one of the last `window` positions are read
        assert len(layout.row_of) == sum(-(-n // BS) - max(0, n - window) // BS for n in lengths) or isinstance(layout.blocks, slice)
    got = decode_attention(q, k, v, layout, scale=0.3, softcap=softcap)
    want = paged_attention_reference(q[:, :, None], k, v, tables, [n - 1 for n in lengths], 0.3, window, softcap)[:, :, 0]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("start,length", [(0, 11), (9, 6), (14, 1), (21, 3)])
@pytest.mark.parametrize("window,softcap", [(5, None), (4, 2.0), (None, 2.0)])
def test_prefill_attention_with_a_sliding_window_or_soft_cap_matches_the_reference(start, length, window, softcap):
    rng = random.Random(start * 7 + length)
    tables = random_tables([start + length], 64, rng)
    k, v = pools(64, start)
    q = torch.randn(KVH * REP, length, HD, generator=torch.Generator().manual_seed(6)) * 3
    got = prefill_attention(q, k, v, PrefillLayout(torch.tensor(tables[0]), start), 0.25, window=window, softcap=softcap)
    want = paged_attention_reference(q[None], k, v, tables, [start], 0.25, window, softcap)[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
