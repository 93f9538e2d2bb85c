"""Choosing the next token of each row from its logits (pure functions over tensors).

Semantics follow Hugging Face's logits processors so that greedy decoding here equals
``generate(do_sample=False)``: repetition penalty divides positive and multiplies negative logits
of tokens already seen (Keskar et al., 2019); top-k keeps the k largest; top-p keeps the smallest
set whose probability reaches p; then softmax at the temperature and one draw from the row's own
generator, so a seeded request reproduces its tokens whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from openlora_ray.engine.request import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """``logits`` (V,), ``seen`` (N,) token ids -> penalised copy."""
    scores = logits.gather(0, seen)
    logits = logits.clone()
    logits.scatter_(0, seen, torch.where(scores > 0, scores / penalty, scores * penalty))
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` (V,) with everything outside top-k / the top-p nucleus set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,  # (B, V) float
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    seen: Sequence[torch.Tensor],  # per row (N_i,) token ids for the repetition penalty
) -> list[int]:
    """One token per row. Greedy rows of a batch are decided with a single argmax."""
    logits = logits.float()
    out = logits.argmax(-1).tolist()  # right for every greedy row without a penalty
    for i, p in enumerate(params):
        if p.greedy and p.repetition_penalty == 1.0:
            continue
        row = logits[i]
        if p.repetition_penalty != 1.0:
            row = apply_repetition_penalty(row, seen[i], p.repetition_penalty)
        if p.greedy:
            out[i] = int(row.argmax())
            continue
        row = filter_top_k_top_p(row / p.temperature, p.top_k, p.top_p)
        out[i] = int(torch.multinomial(row.softmax(-1), 1, generator=generators[i]))
    return out
