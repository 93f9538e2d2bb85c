"""The batched LoRA op matches its one-row-at-a-time definition."""

from __future__ import annotations

import pytest
import torch

from openlora_ray.lora.ops import NO_ADAPTER, add_lora_delta, lora_delta_reference


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("with_base_rows", [False, True])
def test_add_lora_delta_matches_reference(dtype, tol, with_base_rows):
    gen = torch.Generator().manual_seed(0)
    S, n, R, d_in, splits, B, L = 5, 3, 8, 32, (32, 16, 16), 7, 4
    ranks = [8, 3, 5, 1, 8]
    a = torch.zeros(S, n, R, d_in)
    b = torch.zeros(S, R, sum(splits))
    for s, r in enumerate(ranks):  # zero padding beyond each slot's rank, as the slots hold it
        a[s, :, :r] = torch.randn(n, r, d_in, generator=gen)
        b[s, :r] = torch.randn(r, sum(splits), generator=gen)
    a, b = a.to(dtype), b.to(dtype)
    x = torch.randn(B, L, d_in, generator=gen).to(dtype)
    slots = torch.tensor([2, NO_ADAPTER, 0, 2, 4, NO_ADAPTER, 1] if with_base_rows else [2, 3, 0, 2, 4, 1, 1])
    want = lora_delta_reference(x.float(), a.float(), b.float(), slots, splits)

    rows = (slots != NO_ADAPTER).nonzero().flatten()
    used = slots[rows]
    y = torch.zeros(B, L, sum(splits), dtype=dtype)
    add_lora_delta(y, x, a, b, rows if with_base_rows else None, used, max(ranks[s] for s in used.tolist()), splits, (0, 1, 2))
    torch.testing.assert_close(y.float(), want, rtol=tol, atol=tol * want.abs().max().item())
    assert want.abs().max() > 1  # a non-trivial delta


def test_rank_slicing_ignores_nothing_that_matters():
    """Slicing to the batch's largest rank gives the same result as the full padded rank."""
    gen = torch.Generator().manual_seed(1)
    a = torch.zeros(2, 1, 16, 8)
    b = torch.zeros(2, 16, 8)
    a[:, :, :4] = torch.randn(2, 1, 4, 8, generator=gen)
    b[:, :4] = torch.randn(2, 4, 8, generator=gen)
    x = torch.randn(2, 3, 8, generator=gen)
    y_sliced, y_full = torch.zeros(2, 3, 8), torch.zeros(2, 3, 8)
    slots = torch.tensor([1, 0])
    add_lora_delta(y_sliced, x, a, b, None, slots, 4, (8,), (0,))
    add_lora_delta(y_full, x, a, b, None, slots, 16, (8,), (0,))
    torch.testing.assert_close(y_sliced, y_full)
