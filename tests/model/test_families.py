"""Every dense family against transformers (and PEFT), through the engine runner's paged path.

For each tiny random model (``families.py``): the plain forward equals transformers' logits; rows
of different lengths, each with its own adapter or none, prefilled in chunks through the paged
cache (one of them from another row's cached prefix blocks) and then decoded together past the
sliding window equal transformers / PEFT position by position, and so do their greedy tokens; the
same when every step is one forward of the rows decoding and the chunks of rows still prefilling.
"""

from __future__ import annotations

import pytest
import torch
from family_models import (
    FAMILIES,
    adapter_targets,
    build,
    hf_logits,
    load_hf,
    random_tokens,
)
from peft import PeftModel
from peft_helpers import save_peft_adapter

from openlora_ray.engine.runner import DecodeRow, ModelRunner, PrefillRow
from openlora_ray.lora.ops import NO_ADAPTER
from openlora_ray.lora.weights import load_lora_weights
from openlora_ray.model.family import FamilySpec, UnsupportedFamilyError
from openlora_ray.model.llama import MultiLoraLlama

TOL = {"rtol": 1e-4, "atol": 1e-4}
BS = 4  # KV block size: windows and chunks straddle block edges
CHUNK = 5  # prefill chunk


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    made = {}

    def get(family: str):
        if family not in made:
            made[family] = build(family, tmp_path_factory.mktemp(family))
        return made[family]

    return get


def ours(path, num_slots: int = 3, max_rank: int = 8) -> MultiLoraLlama:
    return MultiLoraLlama(load_hf(path), num_slots, max_rank).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.inference_mode()
def test_the_plain_forward_equals_transformers(family_dirs, family):
    path = family_dirs(family)
    hf, model = load_hf(path), ours(path)
    seqs = torch.tensor([random_tokens(21, seed=1), random_tokens(21, seed=2)])
    got = model(seqs, torch.arange(21).expand(2, -1))
    torch.testing.assert_close(got, hf(seqs).logits, **TOL)


TOTAL = 19  # > WINDOW + the longest prompt: decode runs well past the window
PROMPTS = [9, 3, 13, 11]
SLOTS = [0, NO_ADAPTER, 1, 0]
TABLES = [list(range(5 * i, 5 * i + 5)) for i in range(3)] + [[0, 1, 30, 31, 32]]  # row 3 shares row 0's first blocks


def with_adapters(path, tmp_path, family):
    """Our model with two PEFT adapters (different ranks and targets) in slots 0 and 1; four rows of
    ``TOTAL`` tokens (row 3 starts with row 0's first 8) and each row's logits from transformers/PEFT."""
    model = ours(path)
    every, few = adapter_targets(family)
    adapters = {
        0: save_peft_adapter(path, tmp_path / "a", r=8, alpha=5.0, targets=every, seed=11),
        1: save_peft_adapter(path, tmp_path / "b", r=2, alpha=7.0, targets=few, seed=12),
    }
    for slot, folder in adapters.items():
        model.write_slot(slot, load_lora_weights(str(slot), folder, model.dims, 8, torch.float32))
    refs = {slot: PeftModel.from_pretrained(load_hf(path), folder).eval() for slot, folder in adapters.items()}
    refs[NO_ADAPTER] = load_hf(path)
    seqs = [random_tokens(TOTAL, seed=20 + i) for i in range(4)]
    seqs[3][:8] = seqs[0][:8]  # row 3 starts from row 0's two cached blocks
    return model, seqs, [hf_logits(refs[s], seq) for s, seq in zip(SLOTS, seqs)]


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.inference_mode()
def test_paged_prefill_and_decode_with_adapters_equal_transformers_and_peft_row_by_row(family_dirs, tmp_path, family):
    path = family_dirs(family)
    spec = FamilySpec.from_config(load_hf(path).config)
    model, seqs, want = with_adapters(path, tmp_path, family)
    total, prompts, slots, tables = TOTAL, PROMPTS, SLOTS, TABLES
    runner = ModelRunner(model, num_blocks=40, block_size=BS)
    for i, n in enumerate(prompts):
        start = 8 if i == 3 else 0  # the prefix-cached row prefills only what follows its hit
        for lo in range(start, n, CHUNK):
            hi = min(n, lo + CHUNK)
            logits = runner.prefill(seqs[i][lo:hi], start=lo, blocks=tables[i], slot=slots[i])
            torch.testing.assert_close(logits, want[i][hi - 1], **TOL)
    pos = list(prompts)
    while min(pos) < total:
        live = [i for i in range(4) if pos[i] < total]
        rows = [DecodeRow(token=seqs[i][pos[i]], position=pos[i], blocks=tables[i], slot=slots[i]) for i in live]
        logits = runner.decode(rows)
        for r, i in enumerate(live):
            torch.testing.assert_close(logits[r], want[i][pos[i]], **TOL)
            assert logits[r].argmax() == want[i][pos[i]].argmax()  # the greedy token
            pos[i] += 1
    assert spec.sliding_window is None or total > spec.sliding_window + CHUNK  # rows read past their window


def test_specs_say_what_each_family_computes(family_dirs):
    spec = {f: FamilySpec.from_config(load_hf(family_dirs(f)).config) for f in ("gemma2", "gemma3", "qwen2-window", "phi3-longrope-partial")}
    assert spec["gemma2"].layer_windowed == (True, False, True, False) and spec["gemma2"].attn_softcap == 3.0
    assert spec["gemma3"].layer_windowed == (True, True, False, True)
    assert [r.rope_type for r in spec["gemma3"].ropes] == ["default", "linear"] and spec["gemma3"].layer_rope == (0, 0, 1, 0)
    assert spec["gemma3"].attn_scale == 24**-0.5 and spec["gemma3"].embed_scale == 8.0 and spec["gemma3"].norm == "rms_one_plus"
    assert spec["qwen2-window"].layer_windowed == (False, True, True, True)
    assert spec["phi3-longrope-partial"].ropes[0].rotary_dim == 8 and spec["phi3-longrope-partial"].max_positions == 64


def test_a_family_outside_the_table_is_refused_by_name():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedFamilyError, match="'gpt2'"):
        FamilySpec.from_config(GPT2Config())


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.inference_mode()
def test_steps_mixing_decode_rows_and_prefill_chunks_equal_transformers_and_peft(family_dirs, tmp_path, family):
    """Row i starts at step i, so most steps hold decode rows and chunks of other rows (and other
    adapters, or none) in one forward; row 3 prefills after row 0's blocks it shares are written."""
    path = family_dirs(family)
    model, seqs, want = with_adapters(path, tmp_path, family)
    runner = ModelRunner(model, num_blocks=40, block_size=BS)
    pos = [0, 0, 0, 8]
    mixed_steps = 0
    for step in range(100):
        live = [i for i in range(4) if i <= step and pos[i] < TOTAL]
        if not live:
            break
        rows, chunks, decoded, sampled = [], [], [], []  # (row, position) whose logits come back, in order
        for i in live:
            if pos[i] < PROMPTS[i]:
                hi = min(PROMPTS[i], pos[i] + CHUNK)
                chunks.append(PrefillRow(seqs[i][pos[i] : hi], pos[i], TABLES[i], SLOTS[i], sample=hi == PROMPTS[i]))
                if hi == PROMPTS[i]:
                    sampled.append((i, hi - 1))
                pos[i] = hi
            else:
                rows.append(DecodeRow(token=seqs[i][pos[i]], position=pos[i], blocks=TABLES[i], slot=SLOTS[i]))
                decoded.append((i, pos[i]))
                pos[i] += 1
        mixed_steps += bool(rows and chunks)
        expect = decoded + sampled
        logits = runner.step(rows, chunks)
        assert logits.shape[0] == len(expect)
        for r, (i, p) in enumerate(expect):
            torch.testing.assert_close(logits[r], want[i][p], **TOL)
            assert logits[r].argmax() == want[i][p].argmax()
    assert min(pos) == TOTAL and mixed_steps >= 3
