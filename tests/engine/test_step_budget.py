"""Budgets CI can hold without a GPU: host synchronisations and ops dispatched per decode step.

On a GPU every ``.item()``, ``int(tensor)`` or ``bool(tensor)`` stalls the host until the device
catches up; on CPU the same calls dispatch ``aten._local_scalar_dense``, so a dispatch mode counts
them here. The step's one deliberate copy to the host is ``SampledBatch.to_host``.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from openlora_ray.engine import sampling
from openlora_ray.engine.request import SamplingParams
from openlora_ray.engine.runner import DecodeRow, ModelRunner, PrefillRow
from openlora_ray.engine.sampling import RowContext
from openlora_ray.lora.ops import NO_ADAPTER
from openlora_ray.lora.weights import load_lora_weights
from openlora_ray.model.loader import load_multi_lora_model

# Measured on the tiny model: 89 ops per decoder layer base-only (RMSNorm, rotary embedding, four
# projection groups, paged attention, the KV write) and about 200 when rows of the batch use an
# adapter on all seven projections (a shrink and an expand bmm per projection, plus the row
# grouping); about 60 outside the layers, and up to 60 more for sampling with penalties, bias and
# log probabilities. Kernel launches on a GPU scale with these counts (CUDA graphs are the GPU
# path's answer); the budgets keep them from creeping up.
OPS_PER_LAYER_BUDGET = {"base": 100, "adapters": 220}
OPS_OUTSIDE_LAYERS_BUDGET = 150
# A prefill chunk in a step adds its attention (gather, mask, SDPA) and, with an adapter, its own
# LoRA group per layer: 59 ops per chunk and layer measured (one chunk with an adapter on all
# projections, one without), where running it as a forward of its own repeated the whole layer.
OPS_PER_CHUNK_PER_LAYER_BUDGET = 70


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("rows", [1, 8])
@pytest.mark.parametrize("kind", ["base", "adapters"])
def test_a_decode_step_syncs_once_and_dispatches_a_bounded_number_of_ops(tiny_model_dir, make_adapter, monkeypatch, rows, kind):
    model = load_multi_lora_model(tiny_model_dir, num_slots=2, max_rank=8, dtype=torch.float32)
    model.write_slot(0, load_lora_weights("a", make_adapter("budget-a", r=8, alpha=4.0, seed=90), model.dims, 8, torch.float32))
    runner = ModelRunner(model, num_blocks=64, block_size=4)
    decode = [DecodeRow(token=5 + i, position=9 + i % 3, blocks=[2 * i, 2 * i + 1, 40 + i], slot=0 if kind == "adapters" and i % 2 == 0 else NO_ADAPTER) for i in range(rows)]
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=3, repetition_penalty=1.2, logprobs=2),
        SamplingParams(temperature=1.0, frequency_penalty=0.5, logit_bias={7: 3.0}, min_tokens=4),
    ]
    ctx = [
        RowContext(params[i % 3], torch.Generator().manual_seed(i), [1, 2, 3], [4, 5], frozenset({2}))
        for i in range(rows)
    ]
    copies = []
    real = sampling.SampledBatch.to_host
    monkeypatch.setattr(sampling.SampledBatch, "to_host", lambda self: copies.append(1) or real(self))
    runner.sample(runner.decode(decode), ctx)  # warm-up
    copies.clear()
    with CountOps() as counter:
        out = runner.sample(runner.decode(decode), ctx)
    assert len(out) == rows and all(isinstance(t, int) for t, _ in out)
    assert counter.ops["aten._local_scalar_dense"] == 0, "a hidden .item()/int()/bool() on a tensor: a host sync per call on a GPU"
    assert copies == [1], "the step reads its results back in exactly one copy"
    layers = model.dims.num_layers
    total = sum(counter.ops.values())
    print(f"{kind}, {rows} rows: {total} ops per decode step ({layers} layers); top: {counter.ops.most_common(6)}")
    assert total <= OPS_PER_LAYER_BUDGET[kind] * layers + OPS_OUTSIDE_LAYERS_BUDGET


def test_a_step_with_prefill_chunks_syncs_nowhere_and_each_chunk_adds_a_bounded_number_of_ops(
    tiny_model_dir, make_adapter
):
    """Prefill chunks join the decode rows' forward (``ModelRunner.step``): each chunk adds its own
    attention and LoRA group per layer, not a whole forward, and no host sync."""
    model = load_multi_lora_model(tiny_model_dir, num_slots=2, max_rank=8, dtype=torch.float32)
    adapter = make_adapter("budget-a", r=8, alpha=4.0, seed=90)
    model.write_slot(0, load_lora_weights("a", adapter, model.dims, 8, torch.float32))
    runner = ModelRunner(model, num_blocks=64, block_size=4)
    decode = [
        DecodeRow(token=5 + i, position=9, blocks=list(range(3 * i, 3 * i + 3)), slot=i % 2 - 1) for i in range(8)
    ]
    chunks = [
        PrefillRow(tokens=list(range(3, 3 + 7)), start=0, blocks=[40, 41], slot=0, sample=True),
        PrefillRow(tokens=list(range(20, 25)), start=4, blocks=[40, 42, 43], slot=NO_ADAPTER, sample=False),
    ]
    counts = []
    for pieces in ((), chunks):
        runner.step(decode, pieces)  # warm-up
        with CountOps() as counter:
            logits = runner.step(decode, pieces)
        assert logits.shape[0] == len(decode) + sum(c.sample for c in pieces)
        assert counter.ops["aten._local_scalar_dense"] == 0, "a hidden .item()/int()/bool(): a host sync on a GPU"
        counts.append(sum(counter.ops.values()))
    per_chunk_per_layer = (counts[1] - counts[0]) / len(chunks) / model.dims.num_layers
    print(f"ops per step: {counts[0]} decode only, {counts[1]} with {len(chunks)} chunks "
          f"({per_chunk_per_layer:.1f} per chunk per layer)")
    assert per_chunk_per_layer <= OPS_PER_CHUNK_PER_LAYER_BUDGET
