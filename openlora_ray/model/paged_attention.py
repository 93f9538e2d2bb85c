"""Attention over a paged KV cache, stated as reference PyTorch and implemented without row loops.

Layout. Each layer's cache is a pool of blocks, ``k: (NB, KVH, hd, bs)`` and ``v: (NB, KVH, bs,
hd)``: block-major, so that a run of blocks is one contiguous piece of memory a batched matmul
reads without a copy, and keys transposed within a block, so that a block's scores are one
``(rep, hd) @ (hd, bs)`` product (the ``(bs, hd) @ (hd, rep)`` form ran 17x slower in MKL's batched
GEMM on CPU: an output 3 columns wide). A sequence's block table lists the blocks holding its
tokens, token ``p`` at offset ``p % bs`` of block ``table[p // bs]``. Grouped query attention folds
the ``rep = H / KVH`` query heads that share a KV head into one axis, so no key or value is ever
repeated per head.

Semantics (for one row with block table ``table`` whose queries sit at positions
``start .. start + L - 1``)::

    k_row = cat([k[b].mT for b in table], dim=1)[:, :start + L]     # (KVH, T, hd)
    for each query head h (KV head h // rep), query i:
        s = q[h, i] @ k_row[h // rep].T * scale
        s = cap * tanh(s / cap)                        # soft-capping (Gemma 2), when a cap is given
        out[h, i] = softmax(s, keys j <= start + i and, in a windowed layer, j > start + i - window) @ v_row[h // rep]

``paged_attention_reference`` is exactly that, one row at a time. Two paths must match it:

* ``prefill_attention``: one sequence, L new tokens. Its blocks are gathered (one copy of its
  context, small beside the chunk's GEMMs) and one SDPA call runs with the causal mask aligned to
  the end of the context (``is_causal`` would align it to the start: wrong after a cached prefix).
* ``decode_attention``: B rows, one query each. Gathering every row's context per layer would copy
  as many bytes as attention reads (measured on CPU: the gather cost more than the attention), so
  the pool is read in place where it can be. Scores are computed block by block for every
  (row, block) pair, ``s = q_row @ K_block^T`` as one batched matmul over all pairs; the softmax over
  a row's blocks is segmented (per-row max by ``scatter_reduce``, sum by ``index_add``); the output is
  the per-block ``softmax @ V_block`` summed per row. When the batch's blocks are distinct and
  dense in the pool (the usual case), the pairs are simply ``blocks lo..hi`` read as a view; when
  blocks are shared (prefix-cache hits, ``n > 1``) or scattered, the pairs' blocks are gathered.
  Each row attends over its own length only: positions past it are masked in its last block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MASKED = -1e30  # finite "minus infinity": a padding pair's max stays finite, so exp() is 0, not NaN


@dataclass(frozen=True)
class PrefillLayout:
    """One sequence's chunk: its block table up to the chunk's end, and where the chunk starts."""

    blocks: torch.Tensor  # (nb,) long
    start: int  # tokens already in the cache before this chunk


@dataclass(frozen=True)
class ChunkSpan:
    """A prefill chunk inside a mixed step (``runner.step``), where every token is a row of its
    own: rows ``row .. row + length - 1`` are its tokens, attending as ``prefill_attention`` does."""

    row: int
    length: int
    layout: PrefillLayout


@dataclass(frozen=True)
class DecodeLayout:
    """The (row, block) pairs of a decode batch, built once per step for every layer.

    blocks  (P,) long pool blocks to gather, or a slice ``lo:hi`` read in place
    row_of  (P,) long batch row of each pair; ``num_rows`` for a padding pair
    masked  (P, 1, 1, bs) bool, True = not part of the row's context
    """

    blocks: torch.Tensor | slice
    row_of: torch.Tensor
    masked: torch.Tensor
    num_rows: int


def build_decode_layout(
    tables: Sequence[Sequence[int]],
    lengths: Sequence[int],
    block_size: int,
    device: torch.device,
    window: int | None = None,
) -> DecodeLayout:
    """Pairs for rows with block tables ``tables`` and contexts of ``lengths`` tokens (this step's
    token included). With a sliding ``window`` a row reads only its last ``window`` positions, so
    its blocks before them are left out and the positions before them masked in the first block
    kept. In place when every block is used once and the used range is at most twice the blocks
    used; gathered otherwise."""
    pairs: list[tuple[int, int, int, int]] = []  # (block, row, first valid offset, end of valid offsets)
    for row, (table, length) in enumerate(zip(tables, lengths)):
        first = 0 if window is None else max(0, length - window)
        for i in range(first // block_size, -(-length // block_size)):
            pairs.append((table[i], row, max(0, first - i * block_size), min(block_size, length - i * block_size)))
    used = [b for b, _, _, _ in pairs]
    lo, hi = min(used), max(used) + 1
    num_rows = len(tables)
    if len(set(used)) == len(used) and hi - lo <= 2 * len(used):
        row_of, start, end = [num_rows] * (hi - lo), [0] * (hi - lo), [0] * (hi - lo)
        for block, row, a, b in pairs:
            row_of[block - lo], start[block - lo], end[block - lo] = row, a, b
        blocks: torch.Tensor | slice = slice(lo, hi)
    else:
        row_of, start, end = [p[1] for p in pairs], [p[2] for p in pairs], [p[3] for p in pairs]
        blocks = torch.tensor(used, device=device)
    offsets = torch.arange(block_size, device=device)[None, :]
    masked = offsets >= torch.tensor(end, device=device)[:, None]  # (P, bs)
    if window is not None:
        masked |= offsets < torch.tensor(start, device=device)[:, None]
    return DecodeLayout(blocks, torch.tensor(row_of, device=device), masked[:, None, None, :], num_rows)


def attend(
    q: torch.Tensor,  # (..., M, hd)
    k: torch.Tensor,  # (..., T, hd)
    v: torch.Tensor,  # (..., T, hd)
    mask: torch.Tensor,  # (..., M, T) bool, True = may attend
    scale: float,
    softcap: float | None,
) -> torch.Tensor:  # (..., M, hd)
    """SDPA, or with Gemma 2's soft-capping (``cap * tanh(s / cap)`` on the scaled scores before
    the mask, softmax in float32 as transformers' eager attention) written out: SDPA has no cap."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.mT).mul_(scale).div_(softcap).tanh_().mul_(softcap)
    scores = scores.masked_fill_(~mask, float("-inf")).softmax(-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(scores, v)


def write_kv(
    k_pool: torch.Tensor,  # (NB, KVH, hd, bs)
    v_pool: torch.Tensor,  # (NB, KVH, bs, hd)
    blocks: torch.Tensor,  # (N,) long, the block of each new token
    offsets: torch.Tensor,  # (N,) long, its position within the block
    k: torch.Tensor,  # (N, KVH, hd)
    v: torch.Tensor,
) -> None:
    k_pool[blocks, :, :, offsets] = k
    v_pool[blocks, :, offsets] = v


def prefill_attention(
    q: torch.Tensor,  # (H, L, hd) one sequence's new queries
    k_pool: torch.Tensor,  # (NB, KVH, hd, bs), this chunk already written
    v_pool: torch.Tensor,  # (NB, KVH, bs, hd)
    layout: PrefillLayout,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:  # (H, L, hd)
    """With a sliding ``window``, query ``p`` reads keys ``p - window < j <= p``: blocks wholly
    before the chunk's first query's window are not gathered."""
    heads, length, hd = q.shape
    kvh = k_pool.shape[1]
    rep = heads // kvh
    total = layout.start + length
    bs = k_pool.shape[-1]
    skip = 0 if window is None else max(0, layout.start - window + 1) // bs  # leading blocks no query reads
    blocks = layout.blocks if skip == 0 else layout.blocks[skip:]
    first = skip * bs  # position of the first gathered key
    k = k_pool.index_select(0, blocks).permute(1, 0, 3, 2).reshape(kvh, -1, hd)[:, : total - first]  # (KVH, T, hd)
    v = v_pool.index_select(0, blocks).transpose(0, 1).reshape(kvh, -1, hd)[:, : total - first]
    query_pos = layout.start + torch.arange(length, device=q.device)
    key_pos = first + torch.arange(total - first, device=q.device)
    mask = key_pos[None, :] <= query_pos[:, None]  # (L, T)
    if window is not None:
        mask &= key_pos[None, :] > query_pos[:, None] - window
    q = q.reshape(kvh, rep * length, hd)  # (KVH, rep*L, hd): heads h = kvh*rep + r
    out = attend(q, k, v, mask.repeat(rep, 1), scale, softcap)
    return out.view(heads, length, hd)


def decode_attention(
    q: torch.Tensor,  # (B, H, hd) one query per row
    k_pool: torch.Tensor,  # (NB, KVH, hd, bs), this step's tokens already written
    v_pool: torch.Tensor,  # (NB, KVH, bs, hd)
    layout: DecodeLayout,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:  # (B, H, hd)
    rows, heads, hd = q.shape
    kvh = k_pool.shape[1]
    rep = heads // kvh
    if isinstance(layout.blocks, slice):
        k, v = k_pool[layout.blocks], v_pool[layout.blocks]  # (P, KVH, hd, bs), (P, KVH, bs, hd): views
    else:
        k, v = k_pool.index_select(0, layout.blocks), v_pool.index_select(0, layout.blocks)
    # One padding row (index B) absorbs the pairs of unused blocks in an in-place range.
    q_rows = torch.cat([q, q.new_zeros(1, heads, hd)]).view(rows + 1, kvh, rep, hd)
    q_pairs = q_rows.index_select(0, layout.row_of)  # (P, KVH, rep, hd)
    scores = torch.matmul(q_pairs, k).mul_(scale)  # (P, KVH, rep, bs)
    if softcap is not None:
        scores.div_(softcap).tanh_().mul_(softcap)
    scores.masked_fill_(layout.masked, MASKED)
    block_max = scores.amax(-1)  # (P, KVH, rep)
    index = layout.row_of[:, None, None].expand_as(block_max)
    row_max = torch.full((rows + 1, kvh, rep), MASKED, dtype=scores.dtype, device=q.device)
    row_max.scatter_reduce_(0, index, block_max, "amax")  # (B+1, KVH, rep)
    weights = scores.sub_(row_max.index_select(0, layout.row_of)[..., None]).exp_()  # (P, KVH, rep, bs)
    denom = torch.zeros_like(row_max).index_add_(0, layout.row_of, weights.sum(-1))  # (B+1, KVH, rep)
    partial = torch.matmul(weights, v)  # (P, KVH, rep, hd)
    out = torch.zeros(rows + 1, kvh, rep, hd, dtype=q.dtype, device=q.device).index_add_(0, layout.row_of, partial)
    return (out[:rows] / denom[:rows, :, :, None]).view(rows, heads, hd)


def paged_attention_reference(
    q: torch.Tensor,  # (B, H, L, hd)
    k_pool: torch.Tensor,  # (NB, KVH, hd, bs)
    v_pool: torch.Tensor,  # (NB, KVH, bs, hd)
    tables: Sequence[Sequence[int]],
    starts: Sequence[int],  # tokens in each row's cache before its L queries
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:  # (B, H, L, hd)
    """The definition, one row and one head at a time, in float64. For tests only."""
    rows, heads, length, hd = q.shape
    kvh = k_pool.shape[1]
    out = torch.empty(rows, heads, length, hd, dtype=torch.float64)
    for b in range(rows):
        total = starts[b] + length
        k_row = torch.cat([k_pool[blk].mT for blk in tables[b]], dim=1)[:, :total].double()  # (KVH, T, hd)
        v_row = torch.cat([v_pool[blk] for blk in tables[b]], dim=1)[:, :total].double()
        for h in range(heads):
            g = h // (heads // kvh)
            for i in range(length):
                s = (k_row[g] @ q[b, h, i].double()) * scale  # (T,)
                if softcap is not None:
                    s = torch.tanh(s / softcap) * softcap
                s[starts[b] + i + 1 :] = float("-inf")
                if window is not None:
                    s[: max(0, starts[b] + i + 1 - window)] = float("-inf")
                out[b, h, i] = s.softmax(0) @ v_row[g]
    return out
