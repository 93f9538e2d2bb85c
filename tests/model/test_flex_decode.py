"""FlexAttention decode over the token-major pool (the CUDA path) equals the pair path it replaces.

On CPU flex runs eagerly (it materialises the scores over the whole pool, so only tiny pools
here); ``make gpu-check`` runs the compiled kernel on CUDA against the same reference.
"""

from __future__ import annotations

import pytest
import torch

from openlora_ray.engine.runner import DecodeRow, ModelRunner
from openlora_ray.lora.ops import NO_ADAPTER
from openlora_ray.lora.weights import load_lora_weights
from openlora_ray.model.flex_decode import build_flex_decode, flex_decode_attention
from openlora_ray.model.loader import load_multi_lora_model
from openlora_ray.model.paged_attention import build_decode_layout, decode_attention

BS, NB, KVH, HD, HEADS = 4, 24, 2, 8, 6

# Rows 0 and 1 share their first two blocks (a prefix-cache hit); row 3 is one partial block.
TABLES = [[3, 7, 1, 20], [3, 7, 12], [0, 9, 11, 2, 5, 6], [15]]
LENGTHS = [14, 9, 23, 2]


@pytest.mark.parametrize(("window", "softcap"), [(None, None), (6, None), (None, 5.0), (5, 3.0)])
def test_flex_decode_equals_the_pair_path(window, softcap):
    gen = torch.Generator().manual_seed(11)
    k_tm = torch.randn(NB, BS, KVH, HD, generator=gen)  # token-major pool
    v_tm = torch.randn(NB, BS, KVH, HD, generator=gen)
    q = torch.randn(len(TABLES), HEADS, HD, generator=gen)
    flex = build_flex_decode(TABLES, LENGTHS, block_size=BS, num_blocks=NB, device=torch.device("cpu"), window=window)
    out = flex_decode_attention(q, k_tm, v_tm, flex, scale=0.3, softcap=softcap)  # (B, H, hd)
    pairs = build_decode_layout(TABLES, LENGTHS, BS, torch.device("cpu"), window=window)
    k_view, v_view = k_tm.permute(0, 2, 3, 1), v_tm.permute(0, 2, 1, 3)  # the pair path's shapes
    expected = decode_attention(q, k_view, v_view, pairs, 0.3, softcap)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_the_layout_lists_each_rows_blocks_in_table_order():
    flex = build_flex_decode(TABLES, LENGTHS, block_size=BS, num_blocks=NB, device=torch.device("cpu"), window=6)
    counts = flex.kv_num.flatten().tolist()
    assert counts == [2, 3, 2, 1]  # the blocks of each row's last 6 positions
    assert flex.kv_idx[0, 0, 0, :2].tolist() == [1, 20] and flex.kv_idx[2, 0, 0, :2].tolist() == [5, 6]
    assert flex.logical[1, 7].item() == 1 and flex.logical[0, 3].item() == -1  # row 0's block 3: outside the window
    assert flex.logical[0, 12].item() == -1  # row 1's block, not row 0's


def test_the_runner_decodes_the_same_logits_through_flex(tiny_model_dir, make_adapter):
    """The whole decode step on a token-major cache (prefill written through the views)."""
    logits = {}
    for flex in (False, True):
        model = load_multi_lora_model(tiny_model_dir, num_slots=2, max_rank=8, dtype=torch.float32)
        model.write_slot(0, load_lora_weights("a", make_adapter("flex-a", r=4, alpha=7.0, seed=61), model.dims, 8, torch.float32))
        runner = ModelRunner(model, num_blocks=40, block_size=BS, flex_decode=flex)
        assert runner.cache.token_major is flex
        rows = []
        for i, (length, slot) in enumerate([(9, 0), (3, NO_ADAPTER), (17, 0)]):
            blocks = list(range(10 * i, 10 * i + 6))
            prompt = torch.randint(3, 250, (length,), generator=torch.Generator().manual_seed(i)).tolist()
            runner.prefill(prompt, start=0, blocks=blocks, slot=slot)
            rows.append(DecodeRow(token=5 + i, position=length, blocks=blocks, slot=slot))
        logits[flex] = runner.decode(rows)
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-5)
