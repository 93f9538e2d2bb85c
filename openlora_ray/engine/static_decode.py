"""The decode step with static shapes, and its CUDA graphs.

A CUDA graph replays recorded kernel launches on recorded addresses, so nothing a captured step
reads may change shape with the batch, and no launch may depend on a value the host reads back.
The eager decode step has three such dependencies, and each is padded away here:

- rows: the batch is padded to a bucket size ``Bp`` (``ROW_BUCKETS``, vLLM's sizes); a padding
  row decodes token 0 at position 0, writes its key and value into a scratch block that no
  sequence owns, and attends to that block alone;
- attention pairs: the paged decode computes one score block per (row, block) pair
  (``model/paged_attention.py``), ``P`` of them; ``P`` is padded to a power of two with pairs that
  belong to the absorbing padding row and are fully masked, so every real row's softmax is exact;
- LoRA: ``segment_rows`` groups rows by slot at whatever sizes the batch has; here every row is
  its own group (``V = Bp``, ``C = 1``), every projection of every group is computed at the
  stacks' full rank (zero-padded ranks contribute zeros) and a row without an adapter reads slot 0
  with its input masked to zero (``Segments.mask``), so its delta is exactly zero.

The padded step computes the same logits as the eager one (tests/engine/test_static_decode.py, on
CPU); on CUDA ``DecodeGraphs`` captures one graph per (rows bucket, pairs bucket, any adapter) key
on first use and replays it. On CPU the eager step stays: it has no launch overhead to save, and
padding only adds work. Sampling runs after the graph, eagerly (per-request generators).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from openlora_ray.lora.layers import GroupBatch
from openlora_ray.lora.ops import NO_ADAPTER, RankBand, Segments
from openlora_ray.model.llama import LoraBatch, MultiLoraLlama, PagedBatch, PagedKVCache
from openlora_ray.model.paged_attention import DecodeLayout, build_decode_layout

ROW_BUCKETS = (1, 2, 4, *range(8, 513, 8))


def row_bucket(rows: int) -> int:
    """The smallest captured batch size that holds ``rows``."""
    i = bisect.bisect_left(ROW_BUCKETS, rows)
    if i == len(ROW_BUCKETS):
        raise ValueError(f"{rows} decode rows exceed the largest graph bucket ({ROW_BUCKETS[-1]})")
    return ROW_BUCKETS[i]


def pair_bucket(pairs: int) -> int:
    """Pairs padded to a power of two: at most twice the score blocks, a few dozen graphs in all."""
    return 1 << max(0, pairs - 1).bit_length()


@dataclass(frozen=True)
class StaticKey:
    rows: int  # Bp
    pairs: int  # padded pairs of the full-attention layers
    windowed_pairs: int  # padded pairs of the windowed layers (0 when the model has none)
    lora: bool  # any row uses an adapter


@dataclass(frozen=True)
class StaticInputs:
    """Every tensor one padded decode step reads; shapes fixed by ``key``."""

    key: StaticKey
    tokens: torch.Tensor  # (Bp, 1) long
    positions: torch.Tensor  # (Bp, 1) long
    blocks: torch.Tensor  # (Bp,) long, where each row's new key and value go
    offsets: torch.Tensor  # (Bp,) long
    row_of: torch.Tensor  # (P,) long; Bp = the absorbing padding row
    pair_blocks: torch.Tensor  # (P,) long
    masked: torch.Tensor  # (P, 1, 1, bs) bool
    windowed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # row_of, blocks, masked (Pw, ...)
    slots: torch.Tensor  # (Bp,) long, NO_ADAPTER read as slot 0
    lora_mask: torch.Tensor  # (Bp, 1, 1) model dtype, 0 for a row without an adapter

    def tensors(self) -> list[torch.Tensor]:
        extra = list(self.windowed) if self.windowed is not None else []
        fields = [self.tokens, self.positions, self.blocks, self.offsets, self.row_of, self.pair_blocks, self.masked]
        return [*fields, *extra, self.slots, self.lora_mask]


def _padded(layout: DecodeLayout, pairs: int, scratch: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``layout``'s pairs as explicit block indices, padded to ``pairs`` masked pairs of row ``rows``."""
    dev = layout.row_of.device
    blocks = layout.blocks
    if isinstance(blocks, slice):
        blocks = torch.arange(blocks.start, blocks.stop, device=dev)
    pad = pairs - blocks.shape[0]
    bs = layout.masked.shape[-1]
    return (
        torch.cat([layout.row_of, torch.full((pad,), rows, device=dev)]),
        torch.cat([blocks, torch.full((pad,), scratch, device=dev)]),
        torch.cat([layout.masked, torch.ones(pad, 1, 1, bs, dtype=torch.bool, device=dev)]),
    )


class StaticDecoder:
    """Builds padded inputs and runs the padded step eagerly; ``DecodeGraphs`` replays it on CUDA.

    ``scratch`` is a KV block no sequence owns (the runner allocates one past the block pool's).
    """

    def __init__(self, model: MultiLoraLlama, cache: PagedKVCache, *, block_size: int, scratch: int) -> None:
        if "moe" in model.spec.layer_mlp:
            raise ValueError("static decode (CUDA graphs) does not support mixture-of-experts layers yet")
        self.model, self.cache = model, cache
        self.block_size, self.scratch = block_size, scratch
        self.window = model.spec.sliding_window

    def inputs(self, tokens: Sequence[int], positions: Sequence[int], tables: Sequence[Sequence[int]], slots: Sequence[int]) -> StaticInputs:
        """One decode token per row: row i decodes ``tokens[i]`` at ``positions[i]`` with block table
        ``tables[i]`` and LoRA slot ``slots[i]``."""
        dev, bs, n = self.model.device, self.block_size, len(tokens)
        rows = row_bucket(n)
        pad = rows - n
        tables = [*tables, *([[self.scratch]] * pad)]
        lengths = [p + 1 for p in positions] + [1] * pad
        full = build_decode_layout(tables, lengths, bs, dev)
        p_full = pair_bucket(full.row_of.shape[0])
        windowed, p_win = None, 0
        if self.window is not None:
            win = build_decode_layout(tables, lengths, bs, dev, window=self.window)
            p_win = pair_bucket(win.row_of.shape[0])
            windowed = _padded(win, p_win, self.scratch, rows)
        row_of, pair_blocks, masked = _padded(full, p_full, self.scratch, rows)
        adapted = [s != NO_ADAPTER for s in slots] + [False] * pad
        key = StaticKey(rows, p_full, p_win, any(adapted))
        return StaticInputs(
            key=key,
            tokens=torch.tensor([[t] for t in tokens] + [[0]] * pad, device=dev),
            positions=torch.tensor([[p] for p in positions] + [[0]] * pad, device=dev),
            blocks=torch.tensor([t[p // bs] for t, p in zip(tables, positions)] + [self.scratch] * pad, device=dev),
            offsets=torch.tensor([p % bs for p in positions] + [0] * pad, device=dev),
            row_of=row_of,
            pair_blocks=pair_blocks,
            masked=masked,
            windowed=windowed,
            slots=torch.tensor([max(s, 0) for s in slots] + [0] * pad, device=dev),
            lora_mask=torch.tensor(adapted, dtype=self.model.dtype, device=dev)[:, None, None],
        )

    def lora_batch(self, inputs: StaticInputs) -> LoraBatch | None:
        """Every row its own group, every projection at the full rank (shapes independent of slots)."""
        if not inputs.key.lora:
            return None
        rows = inputs.key.rows
        seg = Segments(order=None, keep=None, slots=inputs.slots, groups=rows, size=1, mask=inputs.lora_mask)
        rank = self.model.max_rank
        band = RankBand(None, seg, rank)
        projs = self.model.group_projs
        return LoraBatch({name: GroupBatch((band,), tuple(range(len(names)))) for name, names in projs.items()})

    @torch.inference_mode()
    def forward(self, inputs: StaticInputs) -> torch.Tensor:
        """Logits (Bp, V) of the padded batch; rows past the real ones are padding."""
        rows = inputs.key.rows
        layout = DecodeLayout(inputs.pair_blocks, inputs.row_of, inputs.masked, rows)
        windowed = None
        if inputs.windowed is not None:
            w_row_of, w_blocks, w_masked = inputs.windowed
            windowed = DecodeLayout(w_blocks, w_row_of, w_masked, rows)
        paged = PagedBatch(inputs.blocks, inputs.offsets, layout, windowed)
        first = torch.zeros(rows, dtype=torch.long, device=inputs.tokens.device)
        return self.model(inputs.tokens, inputs.positions, self.lora_batch(inputs), self.cache, paged, logits_at=first)


class DecodeGraphs:
    """One CUDA graph per ``StaticKey``, captured on first use from static copies of the inputs.

    Replaying copies the step's inputs into the captured buffers (device to device), replays, and
    returns the real rows' logits cloned: the next replay reuses the output's memory.
    """

    def __init__(self, decoder: StaticDecoder, *, warmup: int = 2) -> None:
        if decoder.model.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; on CPU the eager decode step runs")
        self.decoder, self.warmup = decoder, warmup
        self._graphs: dict[StaticKey, tuple[torch.cuda.CUDAGraph, StaticInputs, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def __len__(self) -> int:
        return len(self._graphs)

    @torch.inference_mode()
    def run(self, inputs: StaticInputs, real_rows: int) -> torch.Tensor:
        """Logits (real_rows, V)."""
        entry = self._graphs.get(inputs.key)
        if entry is None:
            entry = self._capture(inputs)
            self._graphs[inputs.key] = entry
        graph, static, out = entry
        for dst, src in zip(static.tensors(), inputs.tensors()):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return out[:real_rows].clone()

    def _capture(self, inputs: StaticInputs) -> tuple[torch.cuda.CUDAGraph, StaticInputs, torch.Tensor]:
        static = inputs  # the first inputs of a key become its buffers
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture: allocator and library handles
            for _ in range(self.warmup):
                self.decoder.forward(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.decoder.forward(static)
        return graph, static, out
