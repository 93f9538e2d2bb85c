"""The padded decode step that CUDA graphs capture computes what the eager step computes.

On CPU the graphs themselves cannot run (``make gpu-check`` replays them on a GPU); what can be
checked here is everything a graph would freeze: the padded step's logits for the real rows equal
the eager step's, with adapters, base rows, rows of different lengths and windowed layers, and the
shapes of its inputs depend on the bucket key alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from openlora_ray.engine.runner import DecodeRow, ModelRunner
from openlora_ray.engine.static_decode import (
    ROW_BUCKETS,
    StaticDecoder,
    pair_bucket,
    row_bucket,
)
from openlora_ray.lora.ops import NO_ADAPTER
from openlora_ray.lora.weights import load_lora_weights
from openlora_ray.model.loader import load_multi_lora_model

BS = 4
NUM_BLOCKS = 96


@pytest.fixture(scope="module")
def windowed_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("tiny-mistral")
    config = MistralConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=6,
    )
    MistralForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


def _runner(model_dir: Path, adapters: list[Path]) -> tuple[ModelRunner, StaticDecoder]:
    model = load_multi_lora_model(model_dir, num_slots=3, max_rank=8, dtype=torch.float32)
    for slot, folder in enumerate(adapters):
        model.write_slot(slot, load_lora_weights(f"a{slot}", folder, model.dims, 8, torch.float32))
    runner = ModelRunner(model, num_blocks=NUM_BLOCKS, block_size=BS)
    return runner, StaticDecoder(model, runner.cache, block_size=BS, scratch=NUM_BLOCKS)


def _rows(lengths: list[int], slots: list[int]) -> list[DecodeRow]:
    """Row i owns blocks 8i.. (scattered tables would do as well: the pairs carry the blocks)."""
    return [
        DecodeRow(token=7 + i, position=n - 1, blocks=list(range(8 * i, 8 * i + 8)), slot=s)
        for i, (n, s) in enumerate(zip(lengths, slots))
    ]


def _fill_cache(runner: ModelRunner, rows: list[DecodeRow]) -> None:
    """Each row's context before its decode token, prefilled through the runner."""
    for r in rows:
        tokens = torch.randint(3, 250, (r.position,), generator=torch.Generator().manual_seed(r.token)).tolist()
        runner.prefill(tokens, start=0, blocks=r.blocks, slot=r.slot)


@pytest.mark.parametrize(
    ("lengths", "slots"),
    [
        ([5, 17, 9, 30, 2], [0, NO_ADAPTER, 1, 0, 2]),  # mixed adapters and a base row; 5 rows pad to 8
        ([12, 3, 25], [NO_ADAPTER] * 3),  # base only: the key says no LoRA
        ([20, 21, 22, 23, 24, 25, 26, 27], [1] * 8),  # one adapter, a full bucket
    ],
)
def test_the_padded_step_equals_the_eager_step(tiny_model_dir, make_adapter, lengths, slots):
    adapters = [make_adapter(f"static-{i}", r=r, alpha=a, seed=40 + i) for i, (r, a) in enumerate([(4, 7.0), (8, 3.0), (2, 5.0)])]
    runner, static = _runner(tiny_model_dir, adapters)
    rows = _rows(lengths, slots)
    _fill_cache(runner, rows)
    eager = runner.decode(rows)  # (B, V)
    inputs = static.inputs([r.token for r in rows], [r.position for r in rows], [r.blocks for r in rows], [r.slot for r in rows])
    padded = static.forward(inputs)  # (Bp, V)
    assert padded.shape[0] == row_bucket(len(rows))
    assert inputs.key.lora == any(s != NO_ADAPTER for s in slots)
    torch.testing.assert_close(padded[: len(rows)], eager, atol=1e-5, rtol=1e-5)
    assert padded[: len(rows)].argmax(-1).tolist() == eager.argmax(-1).tolist()


def test_windowed_layers_pad_their_own_pairs(windowed_model_dir):
    runner, static = _runner(windowed_model_dir, [])
    rows = _rows([3, 14, 27], [NO_ADAPTER] * 3)  # two of them past the window of 6
    _fill_cache(runner, rows)
    eager = runner.decode(rows)
    inputs = static.inputs([r.token for r in rows], [r.position for r in rows], [r.blocks for r in rows], [r.slot for r in rows])
    assert inputs.windowed is not None and inputs.key.windowed_pairs > 0
    torch.testing.assert_close(static.forward(inputs)[:3], eager, atol=1e-5, rtol=1e-5)


def test_input_shapes_depend_on_the_key_alone(tiny_model_dir, make_adapter):
    """What a captured graph needs: two different batches with one key give buffers of one shape."""
    _, static = _runner(tiny_model_dir, [make_adapter("static-0", r=4, alpha=7.0, seed=40)])
    a = static.inputs([5, 6, 7], [9, 3, 30], [list(range(8)), list(range(8, 16)), list(range(16, 24))], [0, NO_ADAPTER, 0])
    tables = [list(range(40 + 8 * i, 48 + 8 * i)) for i in range(4)]
    b = static.inputs([1, 2, 3, 4], [12, 14, 1, 2], tables, [NO_ADAPTER, 0, 0, NO_ADAPTER])
    assert a.key == b.key  # 3 and 4 rows pad to 4; 13 and 10 pairs (a padding row's included) pad to 16
    assert [t.shape for t in a.tensors()] == [t.shape for t in b.tensors()]
    assert [t.dtype for t in a.tensors()] == [t.dtype for t in b.tensors()]


def test_buckets():
    assert [row_bucket(n) for n in (1, 2, 3, 5, 8, 9, 32, 33)] == [1, 2, 4, 8, 8, 16, 32, 40]
    assert [pair_bucket(n) for n in (1, 2, 3, 17, 64)] == [1, 2, 4, 32, 64]
    with pytest.raises(ValueError, match="largest graph bucket"):
        row_bucket(ROW_BUCKETS[-1] + 1)
