"""The model runner: every tensor of a step (inputs, KV cache, logits, sampling) lives here.

The scheduler decides in plain Python which tokens of which sequences a step computes; the runner
turns that into tensors and runs the forward. A step is one forward (``step``): its decode rows and
its prefill chunks' tokens, each token a row of its own (``(T, 1)``), whatever adapters they use, so
the weights are read once per step rather than once per chunk and once more for the decode rows
(a chunk of a few dozen tokens cost about as much as a whole decode step when run on its own). A
chunk that needs every position's logits (``prompt_logprobs``) still runs alone (``prefill``), and
so does every chunk when CUDA graphs replay the decode rows (a graph has static shapes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch

from openlora_ray.engine.request import TokenLogprobs
from openlora_ray.engine.sampling import RowContext, SamplingError, sample_rows
from openlora_ray.engine.static_decode import ROW_BUCKETS, DecodeGraphs, StaticDecoder
from openlora_ray.model.flex_decode import build_flex_decode
from openlora_ray.model.llama import MultiLoraLlama, PagedBatch
from openlora_ray.model.paged_attention import ChunkSpan, PrefillLayout, build_decode_layout


@dataclass(frozen=True)
class DecodeRow:
    token: int  # the sequence's last token, whose keys and values this step computes
    position: int
    blocks: Sequence[int]  # the sequence's block table
    slot: int  # LoRA slot, or NO_ADAPTER


@dataclass(frozen=True)
class PrefillRow:
    """A prefill chunk in a step: ``tokens`` of one sequence at positions ``start..``."""

    tokens: Sequence[int]
    start: int
    blocks: Sequence[int]  # the sequence's block table
    slot: int  # LoRA slot, or NO_ADAPTER
    sample: bool  # the chunk ends at the last known token: its last token's logits are returned


class ModelRunner:
    def __init__(
        self,
        model: MultiLoraLlama,
        *,
        num_blocks: int,
        block_size: int,
        cuda_graphs: bool = False,
        flex_decode: bool | None = None,
    ) -> None:
        """``num_blocks`` blocks for sequences plus one scratch block (the last) that only the
        padding rows of a CUDA-graph step write to. ``cuda_graphs`` takes effect on CUDA only.
        ``flex_decode`` (default: on CUDA) stores the pool token-major and decodes eagerly through
        FlexAttention (``model/flex_decode.py``); the graph step keeps the pair path."""
        self.model = model
        self.device = model.device
        self.block_size = block_size
        self.flex = self.device.type == "cuda" if flex_decode is None else flex_decode
        self.cache = model.new_kv_cache(num_blocks + 1, block_size, token_major=self.flex)
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and self.device.type == "cuda" and "moe" not in model.spec.layer_mlp:
            static = StaticDecoder(model, self.cache, block_size=block_size, scratch=num_blocks)
            self.graphs = DecodeGraphs(static)
        self.mixes = self.graphs is None  # prefill chunks join the decode rows' forward (``step``)

    def _where(self, blocks: Sequence[int], positions: range) -> tuple[list[int], list[int]]:
        """(block, offset) of each position's key and value."""
        bs = self.block_size
        return [blocks[p // bs] for p in positions], [p % bs for p in positions]

    def _chunk_layout(self, blocks: Sequence[int], start: int, n: int) -> PrefillLayout:
        """A chunk of ``n`` tokens from position ``start``: the blocks its queries read, up to its end."""
        used = -(-(start + n) // self.block_size)
        return PrefillLayout(torch.tensor(blocks[:used], device=self.device), start)

    @torch.inference_mode()
    def prefill(
        self, tokens: Sequence[int], *, start: int, blocks: Sequence[int], slot: int, all_logits: bool = False
    ) -> torch.Tensor:
        """Compute ``tokens`` (positions ``start..``) of one sequence; the last one's logits (V,),
        or every one's (L, V) with ``all_logits`` (for the prompt's own log probabilities)."""
        dev, n = self.device, len(tokens)
        where, offsets = self._where(blocks, range(start, start + n))
        layout = self._chunk_layout(blocks, start, n)
        paged = PagedBatch(torch.tensor(where, device=dev), torch.tensor(offsets, device=dev), layout)
        ids = torch.tensor([list(tokens)], device=dev)  # (1, L)
        pos = torch.arange(start, start + n, device=dev)[None]  # (1, L)
        last = None if all_logits else torch.tensor([n - 1], device=dev)
        return self.model(ids, pos, self.model.lora_batch([slot]), self.cache, paged, logits_at=last)[0]

    @torch.inference_mode()
    def decode(self, rows: Sequence[DecodeRow]) -> torch.Tensor:
        """One token for each row, all in one forward; logits (B, V)."""
        if self.graphs is not None and len(rows) <= ROW_BUCKETS[-1]:
            static = self.graphs.decoder.inputs([r.token for r in rows], [r.position for r in rows], [r.blocks for r in rows], [r.slot for r in rows])
            return self.graphs.run(static, len(rows))
        return self.step(rows, ())

    @torch.inference_mode()
    def step(self, rows: Sequence[DecodeRow], chunks: Sequence[PrefillRow]) -> torch.Tensor:
        """Decode ``rows`` and prefill ``chunks`` in one forward; logits (B + S, V): each decode
        row's, then the last token's of each of the S chunks that sample, in order."""
        dev, bs = self.device, self.block_size
        tokens, positions = [r.token for r in rows], [r.position for r in rows]
        where, offsets = [r.blocks[r.position // bs] for r in rows], [r.position % bs for r in rows]
        slots, runs, spans, logit_rows = [r.slot for r in rows], [], [], list(range(len(rows)))
        for c in chunks:
            first, n = len(tokens), len(c.tokens)
            chunk_where, chunk_offsets = self._where(c.blocks, range(c.start, c.start + n))
            tokens += c.tokens
            positions += range(c.start, c.start + n)
            where += chunk_where
            offsets += chunk_offsets
            slots += [c.slot] * n
            runs.append(range(first, first + n))
            spans.append(ChunkSpan(first, n, self._chunk_layout(c.blocks, c.start, n)))
            if c.sample:
                logit_rows.append(first + n - 1)
        layout = windowed = None
        if rows:
            tables, lengths = [r.blocks for r in rows], [r.position + 1 for r in rows]
            window = self.model.spec.sliding_window  # windowed layers read only the rows' last `window` positions
            if self.flex:
                build = partial(
                    build_flex_decode, tables, lengths, block_size=bs, num_blocks=self.cache.num_blocks, device=dev
                )
            else:
                build = partial(build_decode_layout, tables, lengths, bs, dev)
            layout, windowed = build(), build(window=window) if window is not None else None
        paged = PagedBatch(
            torch.tensor(where, device=dev), torch.tensor(offsets, device=dev), layout, windowed, tuple(spans)
        )
        ids = torch.tensor(tokens, device=dev)[:, None]  # (T, 1)
        pos = torch.tensor(positions, device=dev)[:, None]  # (T, 1)
        lora = self.model.lora_batch(slots, runs, one_token=True)
        wanted = torch.tensor(logit_rows, dtype=torch.long, device=dev)  # (B + S,)
        return self.model(ids, pos, lora, self.cache, paged, logit_rows=wanted)

    def new_generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: Sequence[RowContext]) -> list[tuple[int, TokenLogprobs] | SamplingError]:
        """The next token of each row (``logits`` (B, V)), read back in one copy."""
        return sample_rows(logits, rows)
