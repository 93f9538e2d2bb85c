"""The model runner: every tensor of a step (inputs, KV cache, logits, sampling) lives here.

The scheduler decides in plain Python which tokens of which sequences a step computes; the runner
turns that into tensors and runs the forward: one call per prefill chunk (a single sequence,
``(1, L)``) and one batched call for every decode row (``(B, 1)``), whatever adapters they use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from openlora_ray.engine.request import SamplingParams
from openlora_ray.engine.sampling import sample_next
from openlora_ray.model.llama import MultiLoraLlama, PagedBatch
from openlora_ray.model.paged_attention import PrefillLayout, build_decode_layout


@dataclass(frozen=True)
class DecodeRow:
    token: int  # the sequence's last token, whose keys and values this step computes
    position: int
    blocks: Sequence[int]  # the sequence's block table
    slot: int  # LoRA slot, or NO_ADAPTER


@dataclass(frozen=True)
class SampleRow:
    params: SamplingParams
    generator: torch.Generator | None
    history: Sequence[int]  # prompt + generated tokens (for the repetition penalty)


class SamplingError(Exception):
    """Sampling one row failed (its settings, its generator); only that row's request fails."""


class ModelRunner:
    def __init__(self, model: MultiLoraLlama, *, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.device = model.device
        self.block_size = block_size
        self.cache = model.new_kv_cache(num_blocks, block_size)

    def _slots(self, blocks: Sequence[int], positions: range) -> list[int]:
        bs = self.block_size
        return [blocks[p // bs] * bs + p % bs for p in positions]

    @torch.inference_mode()
    def prefill(self, tokens: Sequence[int], *, start: int, blocks: Sequence[int], slot: int) -> torch.Tensor:
        """Compute ``tokens`` (positions ``start..``) of one sequence; the last one's logits (V,)."""
        dev, n = self.device, len(tokens)
        positions = range(start, start + n)
        used = -(-(start + n) // self.block_size)
        paged = PagedBatch(
            torch.tensor(self._slots(blocks, positions), device=dev),
            PrefillLayout(torch.tensor(blocks[:used], device=dev), start),
        )
        ids = torch.tensor([list(tokens)], device=dev)  # (1, L)
        pos = torch.arange(start, start + n, device=dev)[None]  # (1, L)
        last = torch.tensor([n - 1], device=dev)
        return self.model(ids, pos, self.model.lora_batch([slot]), self.cache, paged, logits_at=last)[0]

    @torch.inference_mode()
    def decode(self, rows: Sequence[DecodeRow]) -> torch.Tensor:
        """One token for each row, all in one forward; logits (B, V)."""
        dev = self.device
        slots = [s for r in rows for s in self._slots(r.blocks, range(r.position, r.position + 1))]
        layout = build_decode_layout([r.blocks for r in rows], [r.position + 1 for r in rows], self.block_size, dev)
        paged = PagedBatch(torch.tensor(slots, device=dev), layout)
        ids = torch.tensor([[r.token] for r in rows], device=dev)  # (B, 1)
        pos = torch.tensor([[r.position] for r in rows], device=dev)  # (B, 1)
        first = torch.zeros(len(rows), dtype=torch.long, device=dev)
        return self.model(ids, pos, self.model.lora_batch([r.slot for r in rows]), self.cache, paged, logits_at=first)

    def new_generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[int | SamplingError]:
        """The next token of each row (``logits`` (B, V)); a row whose sampling fails gets its error."""
        seen = [self._seen(r) for r in rows]
        try:
            return list(sample_next(logits, [r.params for r in rows], [r.generator for r in rows], seen))
        except Exception:  # some row is at fault: sample one by one, so that only it fails
            return [self._sample_one(logits[i : i + 1], r, seen[i]) for i, r in enumerate(rows)]

    def _sample_one(self, logits: torch.Tensor, row: SampleRow, seen: torch.Tensor) -> int | SamplingError:
        try:
            return sample_next(logits, [row.params], [row.generator], [seen])[0]
        except Exception as e:  # handed to the row's request, which fails alone
            return SamplingError(f"sampling failed: {e}")

    def _seen(self, row: SampleRow) -> torch.Tensor:
        if row.params.repetition_penalty == 1.0:
            return torch.empty(0, dtype=torch.long, device=self.device)
        return torch.tensor(row.history, dtype=torch.long, device=self.device)
