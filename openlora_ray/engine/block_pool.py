"""The KV block pool: which fixed-size blocks are free, who references each, and the prefix cache.

Pure bookkeeping (no torch): the model runner owns the tensors, this module only hands out block
numbers. A block holds the keys and values of ``block_size`` consecutive tokens of one sequence.

Prefix cache. A *full* block is named by a chained hash: ``h_i = sha256(h_{i-1} || tokens of block
i)``, with ``h_{-1}`` derived from the sequence's *KV identity*: the content digest of the adapter
version whose weights computed those keys and values, or the base model's own identity. Two
sequences share a block only when both the identity and every token up to and including the block
are equal, so KV computed under one adapter (or under an adapter's old weights, pushed again under
the same name) can never be read under another. vLLM keys blocks by the adapter's *name* and serves
stale output after an in-place reload (vllm-project/vllm issues 30931 and 42125).

Blocks no sequence references stay in one queue in eviction order: never-cached blocks at the
front (reused first), cached ones behind them, least recently freed first. A new allocation takes
from the front and drops a cached block's hash as it reuses it; a prefix hit takes a cached block
back out of the queue wherever it is (``touch``).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

BlockHash = bytes


def identity_root(identity: str) -> BlockHash:
    """The hash every chain of an identity starts from (``h_{-1}``)."""
    return hashlib.sha256(b"openlora-kv\0" + identity.encode()).digest()


def extend_block_hashes(hashes: list[BlockHash], identity: str, tokens: Sequence[int], block_size: int) -> None:
    """Append to ``hashes`` the hash of each full block of ``tokens`` it does not cover yet."""
    parent = hashes[-1] if hashes else identity_root(identity)
    for i in range(len(hashes), len(tokens) // block_size):
        block = array("q", tokens[i * block_size : (i + 1) * block_size]).tobytes()
        parent = hashlib.sha256(parent + block).digest()
        hashes.append(parent)


class BlockPool:
    """``num_blocks`` KV blocks: reference counts, the free queue and the hash -> block map."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._refs = [0] * num_blocks
        self._hash: list[BlockHash | None] = [None] * num_blocks
        self._by_hash: dict[BlockHash, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        """Blocks no sequence references (never-cached plus reclaimable cached ones)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks holding a full, named prefix block (referenced or reclaimable)."""
        return len(self._by_hash)

    def refs(self, block: int) -> int:
        return self._refs[block]

    def is_free(self, block: int) -> bool:
        return block in self._free

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks from the front of the free queue; raises if fewer are free."""
        if n > len(self._free):
            raise ValueError(f"asked for {n} KV blocks, {len(self._free)} free")
        blocks = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            old = self._hash[block]
            if old is not None:  # reclaiming a cached block: its prefix is forgotten
                del self._by_hash[old]
                self._hash[block] = None
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced ones join the free queue.

        Freed in reverse, so a sequence's tail blocks are reclaimed before its head blocks: heads
        (system prompts, shared instructions) are the likeliest to be asked for again.
        """
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] < 0:
                raise ValueError(f"KV block {block} freed more often than taken")
            if self._refs[block] == 0:
                self._free[block] = None
                if self._hash[block] is None:
                    self._free.move_to_end(block, last=False)

    def lookup(self, hashes: Sequence[BlockHash]) -> list[int]:
        """The cached blocks of the longest prefix of ``hashes`` (stops at the first miss)."""
        hit = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            hit.append(block)
        return hit

    def touch(self, blocks: Sequence[int]) -> None:
        """Take a reference to cached blocks (a prefix hit), out of the free queue if need be."""
        for block in blocks:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1

    def cache(self, block: int, block_hash: BlockHash) -> None:
        """Name a block that has just become full. A hash already cached keeps its first block
        (block tables are append-only, so the duplicate simply stays unnamed)."""
        if block_hash in self._by_hash or self._hash[block] is not None:
            return
        self._hash[block] = block_hash
        self._by_hash[block_hash] = block
