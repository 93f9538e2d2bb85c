"""Sampling filters and the incremental detokenizer, as pure functions."""

from __future__ import annotations

import torch

from openlora_ray.engine.detokenize import IncrementalText
from openlora_ray.engine.request import SamplingParams
from openlora_ray.engine.sampling import apply_repetition_penalty, filter_top_k_top_p, sample_next


def test_top_k_and_top_p_keep_the_expected_tokens():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    assert torch.isfinite(filter_top_k_top_p(logits, 2, 1.0)).tolist() == [True, True, False, False, False]
    assert torch.isfinite(filter_top_k_top_p(logits, 0, 0.6)).tolist() == [True, True, False, False, False]
    assert torch.isfinite(filter_top_k_top_p(logits, 0, 0.5)).tolist() == [True, False, False, False, False]
    assert torch.isfinite(filter_top_k_top_p(logits, 0, 1.0)).all()


def test_repetition_penalty_follows_hf_semantics():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_sample_next_greedy_and_seeded_rows():
    logits = torch.tensor([[0.0, 3.0, 1.0], [1.0, 1.0, 1.01]])
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=7)]
    draws = {tuple(sample_next(logits, params, [None, torch.Generator().manual_seed(7)], [torch.empty(0)] * 2)) for _ in range(5)}
    assert len(draws) == 1 and next(iter(draws))[0] == 1


def test_incremental_text_holds_back_a_possible_stop_string(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok("Hello world, this is the end. More text.").input_ids
    inc = IncrementalText(tok, stop=("the end",))
    streamed, stopped = "", False
    for i in ids:
        delta, stopped = inc.add(i)
        streamed += delta
        if stopped:
            break
    assert stopped and streamed == "Hello world, this is "
