"""The block pool: allocation, references, the free queue's order and the prefix map."""

from __future__ import annotations

import pytest

from openlora_ray.engine.block_pool import BlockPool, extend_block_hashes


def hashes(identity: str, tokens: list[int], block_size: int = 4) -> list[bytes]:
    out: list[bytes] = []
    extend_block_hashes(out, identity, tokens, block_size)
    return out


def test_hashes_chain_over_every_token_and_the_identity():
    a = hashes("lora:v1", list(range(12)))
    assert len(a) == 3  # full blocks only
    assert hashes("lora:v1", list(range(12)) + [99]) == a  # a partial block is not named
    assert hashes("lora:v2", list(range(12)))[0] != a[0]  # other weights, other names, from block 0
    changed = hashes("lora:v1", [0, 1, 2, 3, 4, 5, 6, 0, 8, 9, 10, 11])
    assert changed[0] == a[0] and changed[1] != a[1] and changed[2] != a[2]  # a change propagates down the chain
    partial: list[bytes] = a[:1]
    extend_block_hashes(partial, "lora:v1", list(range(12)), 4)
    assert partial == a  # extending is the same as computing at once


def test_allocation_free_and_reuse_order():
    pool = BlockPool(6)
    first = pool.allocate(3)
    assert first == [0, 1, 2] and pool.num_free == 3
    hs = hashes("base", list(range(8)))
    pool.cache(first[0], hs[0])
    pool.cache(first[1], hs[1])
    pool.free(first)
    assert pool.num_free == 6 and pool.num_cached == 2
    # Never-named blocks go first; named ones are reclaimed last, tail before head.
    assert pool.allocate(4) == [2, 3, 4, 5]
    assert pool.lookup(hs) == [0, 1]
    assert pool.allocate(1) == [1]  # the tail of the cached chain is reclaimed first ...
    assert pool.lookup(hs) == [0] and pool.num_cached == 1  # ... and forgotten


def test_touch_takes_cached_blocks_back_and_refs_count():
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    hs = hashes("base", list(range(8)))
    for b, h in zip(blocks, hs):
        pool.cache(b, h)
    pool.free(blocks)
    hit = pool.lookup(hs)
    pool.touch(hit)
    pool.touch(hit)  # a second sequence shares them
    assert pool.num_free == 2 and pool.refs(hit[0]) == 2
    pool.free(hit)
    assert pool.num_free == 2
    pool.free(hit)
    assert pool.num_free == 4
    with pytest.raises(ValueError, match="freed more often"):
        pool.free(hit[:1])


def test_duplicate_names_keep_the_first_block_and_too_many_blocks_raise():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    h = hashes("base", [1, 2, 3, 4])[0]
    pool.cache(a, h)
    pool.cache(b, h)  # computed twice by sequences admitted in the same step
    assert pool.lookup([h]) == [a] and pool.num_cached == 1
    with pytest.raises(ValueError, match="asked for 2 KV blocks, 1 free"):
        pool.allocate(2)
