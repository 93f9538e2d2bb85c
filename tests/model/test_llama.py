"""The KV-cached forward equals a full forward, for rows of different lengths and adapters."""

from __future__ import annotations

import pytest
import torch

from openlora_ray.lora.ops import NO_ADAPTER
from openlora_ray.lora.weights import load_lora_weights
from openlora_ray.model.llama import PagedBatch
from openlora_ray.model.loader import load_multi_lora_model
from openlora_ray.model.paged_attention import PrefillLayout, build_decode_layout


@pytest.mark.parametrize("scattered", [False, True], ids=["consecutive-blocks", "scattered-blocks"])
@torch.inference_mode()
def test_chunked_prefill_then_decode_through_the_paged_cache_matches_full_forward(
    tiny_model_dir, make_adapter, scattered, lora_op
):
    model = load_multi_lora_model(tiny_model_dir, num_slots=3, max_rank=8, dtype=torch.float32)
    assert (model.layers[0].groups["qkv"].kernel is not None) == (lora_op == "kernel")
    model.write_slot(1, load_lora_weights("a", make_adapter("kv-a", r=8, alpha=4.0, seed=31), model.dims, 8, torch.float32))
    model.write_slot(2, load_lora_weights("b", make_adapter("kv-b", r=2, alpha=7.0, targets=("k_proj", "v_proj"), seed=32), model.dims, 8, torch.float32))
    slots = [1, NO_ADAPTER, 2]
    lengths = [9, 5, 7]  # prompt lengths differ per row
    total, bs = 12, 4
    seqs = torch.randint(0, 256, (3, total), generator=torch.Generator().manual_seed(4))
    full = model(seqs, torch.arange(total).expand(3, -1), model.lora_batch(slots))  # (3, total, V)

    cache = model.new_kv_cache(num_blocks=16, block_size=bs)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(9)).tolist() if scattered else list(range(16))
    tables = [order[0:3], order[3:6], order[6:9]]  # 3 blocks of 4 = 12 tokens per row

    def where(row: int, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(tables[row])[pos // bs], pos % bs

    # Prefill each row alone in chunks of 4 (different lengths), then decode all rows together.
    for i, n in enumerate(lengths):
        for start in range(0, n, 4):
            pos = torch.arange(start, min(n, start + 4))
            paged = PagedBatch(*where(i, pos), PrefillLayout(torch.tensor(tables[i][: -(-(pos[-1] + 1) // bs)]), start))
            logits = model(seqs[i : i + 1, pos], pos[None], model.lora_batch([slots[i]]), cache, paged)
            torch.testing.assert_close(logits[0], full[i, pos], rtol=1e-4, atol=1e-4)
    pos = torch.tensor(lengths)
    lora = model.lora_batch(slots, one_token=True)
    for _ in range(total - max(lengths)):
        layout = build_decode_layout(tables, (pos + 1).tolist(), bs, torch.device("cpu"))
        blocks, offsets = zip(*(where(r, pos[r : r + 1]) for r in range(3)))
        paged = PagedBatch(torch.cat(blocks), torch.cat(offsets), layout)
        step = model(seqs[torch.arange(3), pos][:, None], pos[:, None], lora, cache, paged, logits_at=torch.zeros(3, dtype=torch.long))
        torch.testing.assert_close(step, full[torch.arange(3), pos], rtol=1e-4, atol=1e-4)
        pos = pos + 1


@torch.inference_mode()
def test_writing_over_another_adapter_leaves_exactly_what_an_empty_slot_would_hold(
    tiny_model_dir, make_adapter, lora_op
):
    """write_slot clears only what the previous occupant left; the result must still be exact, whether the
    copies run as one compiled call or as torch copies."""
    model = load_multi_lora_model(tiny_model_dir, num_slots=2, max_rank=8, dtype=torch.float32)
    assert (model._copier is not None) == (lora_op == "kernel")
    big = load_lora_weights("big", make_adapter("ws-big", r=8, alpha=4.0, seed=41), model.dims, 8, torch.float32)
    small = load_lora_weights("small", make_adapter("ws-small", r=2, alpha=3.0, targets=("q_proj", "down_proj"), seed=42), model.dims, 8, torch.float32)
    model.write_slot(0, big)
    model.write_slot(0, small)  # lower rank, fewer projections: the rest of big must be gone
    model.write_slot(1, small)  # into a slot that never held anything
    for layer in model.layers:
        for group in layer.groups.values():
            assert torch.equal(group.lora_a[0], group.lora_a[1]) and torch.equal(group.lora_b[0], group.lora_b[1])
    model.write_slot(0, big)  # and back up: higher rank over lower
    model.write_slot(1, big)
    assert all(torch.equal(g.lora_b[0], g.lora_b[1]) for layer in model.layers for g in layer.groups.values())
