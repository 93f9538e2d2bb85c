"""Decode attention through FlexAttention over the paged pool: the CUDA path.

On CUDA the paged decode of ``paged_attention.py`` (a score block per (row, block) pair, softmax
by scatter) launches a handful of small kernels per layer and gathers the blocks when a batch's
blocks are scattered, which they are once the pool has churned. FlexAttention compiles one
Triton kernel that walks each row's own block list in the pool in place (block-sparse), with
grouped-query heads read once per KV head: the per-row lengths and block tables are inputs of
that one kernel, not of the kernel count. The pair path stays the reference it must match
(tests/model/test_flex_decode.py runs flex eagerly on CPU; ``make gpu-check`` compiled on CUDA).

Flex reads keys and values as ``(1, KVH, T, hd)`` with a uniform stride along T, so the pool is
stored token-major, ``(NB, bs, KVH, hd)`` for both (``PagedKVCache(token_major=True)``): the
flattened pool is then a view. The CPU keeps its transposed-key layout (see ``paged_attention.py``).

The mask is exact on its own, not only at block granularity: eager flex (CPU) materialises
``mask_mod`` over the whole pool, and a block shared by two rows (prefix cache) is in both lists.
``logical[b, p]`` is the index of pool block p in row b's table, -1 when p is not in it; position
``logical * bs + offset`` must be below the row's length (and, windowed, at least length - window).

    # q (B, H, hd); pool k, v (NB, bs, KVH, hd); row b: table t_b, length n_b
    for b: keys = cat(k[t_b])[:n_b] -> (n_b, KVH, hd);  out[b] = softmax(q[b] . keys * scale) @ values
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention


@dataclass(frozen=True)
class FlexDecodeLayout:
    """Row b's blocks and length for one decode step; every tensor's shape depends on (B, NB) only.

    kv_num   (B, 1, 1) int32     blocks in row b's list
    kv_idx   (B, 1, 1, NB) int32 row b's blocks first (in table order), the rest ignored
    logical  (B, NB) int32       index of each pool block in row b's table, -1 = not row b's
    lengths  (B,) long           context of row b, this step's token included
    window   sliding window of the layers this layout serves, None = full attention
    """

    kv_num: torch.Tensor
    kv_idx: torch.Tensor
    logical: torch.Tensor
    lengths: torch.Tensor
    window: int | None
    block_size: int


def build_flex_decode(
    tables: Sequence[Sequence[int]],
    lengths: Sequence[int],
    *,
    block_size: int,
    num_blocks: int,
    device: torch.device,
    window: int | None = None,
) -> FlexDecodeLayout:
    """The layout for rows with block ``tables`` and contexts of ``lengths`` tokens; a windowed
    layer's rows list only the blocks that hold their last ``window`` positions."""
    rows = len(tables)
    row_ids, block_ids, logical_ids, counts = [], [], [], []
    for row, (table, length) in enumerate(zip(tables, lengths)):
        first = 0 if window is None else max(0, length - window) // block_size
        used = list(range(first, -(-length // block_size)))
        row_ids += [row] * len(used)
        block_ids += [table[i] for i in used]
        logical_ids += used
        counts.append(len(used))
    rows_t = torch.tensor(row_ids, dtype=torch.long)
    blocks_t = torch.tensor(block_ids, dtype=torch.long)
    logical = torch.full((rows, num_blocks), -1, dtype=torch.int32)
    logical[rows_t, blocks_t] = torch.tensor(logical_ids, dtype=torch.int32)
    kv_idx = torch.zeros(rows, num_blocks, dtype=torch.int32)
    starts = torch.tensor([0, *counts[:-1]]).cumsum(0)
    kv_idx[rows_t, torch.arange(len(row_ids)) - starts[rows_t]] = blocks_t.to(torch.int32)
    return FlexDecodeLayout(
        kv_num=torch.tensor(counts, dtype=torch.int32, device=device)[:, None, None],
        kv_idx=kv_idx.to(device)[:, None, None],
        logical=logical.to(device),
        lengths=torch.tensor(lengths, dtype=torch.long, device=device),
        window=window,
        block_size=block_size,
    )


@cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=True)


def flex_decode_attention(
    q: torch.Tensor,  # (B, H, hd) one query per row
    k_pool: torch.Tensor,  # (NB, bs, KVH, hd) token-major, this step's tokens already written
    v_pool: torch.Tensor,  # (NB, bs, KVH, hd)
    layout: FlexDecodeLayout,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:  # (B, H, hd)
    rows, heads, hd = q.shape
    num_blocks, bs, kvh, _ = k_pool.shape
    keys = k_pool.view(1, num_blocks * bs, kvh, hd).transpose(1, 2).expand(rows, -1, -1, -1)  # (B, KVH, T, hd)
    values = v_pool.view(1, num_blocks * bs, kvh, hd).transpose(1, 2).expand(rows, -1, -1, -1)
    logical, lengths, window = layout.logical, layout.lengths, layout.window

    def mask_mod(b, h, q_idx, kv_idx):
        index = logical[b, kv_idx // bs]
        pos = index * bs + kv_idx % bs
        keep = (index >= 0) & (pos < lengths[b])
        return keep if window is None else keep & (pos >= lengths[b] - window)

    def cap(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / softcap) * softcap

    block_mask = BlockMask.from_kv_blocks(
        layout.kv_num,
        layout.kv_idx,
        BLOCK_SIZE=(128, bs),
        mask_mod=mask_mod,
        seq_lengths=(1, num_blocks * bs),
        compute_q_blocks=False,
    )
    attend = _compiled_flex() if q.is_cuda else flex_attention
    out = attend(
        q[:, :, None],  # (B, H, 1, hd)
        keys,
        values,
        score_mod=None if softcap is None else cap,
        block_mask=block_mask,
        scale=scale,
        enable_gqa=heads != kvh,
    )
    return out[:, :, 0]
