"""Choosing the next token of every row of a step at once, on the logits' device.

Reference semantics, one row at a time (``reference_logprobs`` is exactly this, for tests):

    l = logits[row].float()                                              # (V,)
    l[seen] = where(l[seen] > 0, l[seen] / rep, l[seen] * rep)           # repetition penalty (HF;
                                                                         #  Keskar et al., 2019)
    l -= frequency * count(output) + presence * (count(output) > 0)     # OpenAI's penalties
    l[token] += bias for token, bias in logit_bias                       # OpenAI's logit_bias
    if generated < min_tokens: l[eos and stop_token_ids] = -inf          # vLLM's min_tokens
    l[tokens the row's output constraint forbids] = -inf                 # engine/token_masks.py
    logprobs = log_softmax(l / (temperature or 1))                       # what is reported
    greedy: argmax(l); else drop tokens under min_p x the top probability of softmax(l / temperature)
    (vLLM's min_p), keep top_k, then the top_p nucleus, and draw with the row's own generator

Greedy rows equal ``generate(do_sample=False)`` (same repetition-penalty rule). The draw is the
exponential race ``argmax(p / E)``, ``E ~ Exp(1)`` per token, which samples exactly from ``p``:
each row's noise comes from its own seeded generator when it has one, so a seeded request repeats
its tokens whatever else shares its batch, and every row is decided by one batched ``argmax``.
Everything stays on the device; the step copies to the host once (``SampledBatch.to_host``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from openlora_ray.engine.constraints import TokenConstraint
from openlora_ray.engine.request import SamplingParams, TokenLogprobs
from openlora_ray.engine.token_masks import apply_constraints


@dataclass(frozen=True)
class RowContext:
    """What one row's sampling needs besides its logits."""

    params: SamplingParams
    generator: torch.Generator | None
    prompt: Sequence[int]
    output: Sequence[int]  # tokens generated so far
    eos_ids: frozenset[int]  # ids that end the row (masked until min_tokens)
    constraint: TokenConstraint | None = None  # the row's output grammar: tokens outside it are -inf


def _seen_mask(rows: Sequence[RowContext], which: Sequence[int], vocab: int, device: torch.device, output_only: bool) -> torch.Tensor:
    """(len(which), V) float counts of each token in each row's output (or prompt + output)."""
    seqs = [list(rows[i].output) if output_only else [*rows[i].prompt, *rows[i].output] for i in which]
    width = max(1, max(len(s) for s in seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)  # (R, W)
    ones = torch.tensor([[1.0] * len(s) + [0.0] * (width - len(s)) for s in seqs], device=device)
    return torch.zeros(len(which), vocab, device=device).scatter_add_(1, ids, ones)


def process_logits(logits: torch.Tensor, rows: Sequence[RowContext]) -> torch.Tensor:
    """Penalties, bias, min_tokens and output constraints applied to a float32 copy of ``logits`` (B, V)."""
    logits = logits.to(torch.float32, copy=True)
    device, vocab = logits.device, logits.shape[1]
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep:
        seen = _seen_mask(rows, rep, vocab, device, output_only=False) > 0  # (R, V)
        penalty = torch.tensor([rows[i].params.repetition_penalty for i in rep], device=device)[:, None]
        sub = logits[rep]
        logits[rep] = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
    pen = [i for i, r in enumerate(rows) if r.params.frequency_penalty or r.params.presence_penalty]
    if pen:
        counts = _seen_mask(rows, pen, vocab, device, output_only=True)  # (R, V)
        freq = torch.tensor([rows[i].params.frequency_penalty for i in pen], device=device)[:, None]
        pres = torch.tensor([rows[i].params.presence_penalty for i in pen], device=device)[:, None]
        logits[pen] -= freq * counts + pres * (counts > 0)
    bias = [(i, t, b) for i, r in enumerate(rows) for t, b in r.params.logit_bias.items()]
    if bias:
        idx = torch.tensor([[i, t] for i, t, _ in bias], device=device)
        logits.index_put_((idx[:, 0], idx[:, 1]), torch.tensor([b for *_, b in bias], device=device), accumulate=True)
    banned = [
        (i, t)
        for i, r in enumerate(rows)
        if len(r.output) < r.params.min_tokens
        for t in r.eos_ids | set(r.params.stop_token_ids)
    ]
    if banned:
        idx = torch.tensor(banned, device=device)
        logits[idx[:, 0], idx[:, 1]] = float("-inf")
    apply_constraints(logits, [r.constraint for r in rows])
    return logits


@dataclass(frozen=True)
class SampledBatch:
    """The step's choices, still on the device: one copy to the host reads them all."""

    packed: torch.Tensor  # (B, 2 + 2k) float64: token, its logprob, then k top ids and k top logprobs
    top_k: int

    def to_host(self) -> list[tuple[int, TokenLogprobs]]:
        rows = self.packed.tolist()  # the step's one device-to-host copy
        k = self.top_k
        out = []
        for r in rows:
            top = tuple((int(t), lp) for t, lp in zip(r[2 : 2 + k], r[2 + k :]))
            out.append((int(r[0]), TokenLogprobs(r[1], top)))
        return out


def sample(logits: torch.Tensor, rows: Sequence[RowContext]) -> SampledBatch:
    """One token per row of ``logits`` (B, V), with its log probability and the top alternatives."""
    processed = process_logits(logits, rows)
    device = processed.device
    temps = torch.tensor([r.params.temperature or 1.0 for r in rows], device=device)[:, None]
    scaled = processed / temps  # (B, V)
    logprobs = scaled.log_softmax(-1)
    chosen = processed.argmax(-1)  # greedy rows
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    if sampled:
        params = [rows[i].params for i in sampled]
        filtered = _top_k_top_p(_min_p(scaled[sampled], params), params)
        noise = torch.empty_like(filtered)
        for j, i in enumerate(sampled):
            noise[j].exponential_(generator=rows[i].generator)
        chosen[sampled] = (filtered.softmax(-1) / noise).argmax(-1)
    k = max(r.params.logprobs or 0 for r in rows)
    parts = [chosen[:, None].double(), logprobs.gather(1, chosen[:, None]).double()]
    if k:
        top = logprobs.topk(k, dim=-1)
        parts += [top.indices.double(), top.values.double()]
    return SampledBatch(torch.cat(parts, dim=1), k)


NUCLEUS_CANDIDATES = 256  # the tokens top-p first looks for its nucleus among (see _top_k_top_p)


class SamplingError(Exception):
    """Sampling one row failed (its settings, its generator); only that row's request fails."""


def sample_rows(logits: torch.Tensor, rows: Sequence[RowContext]) -> list[tuple[int, TokenLogprobs] | SamplingError]:
    """``sample`` read back to the host; a row whose sampling fails gets its error instead of
    failing the batch (the batch is retried one row at a time to find it, from the generators'
    states before the failed attempt, so the other rows draw what they would have drawn)."""
    states = [(r.generator, r.generator.get_state()) for r in rows if isinstance(r.generator, torch.Generator)]
    try:
        return sample(logits, rows).to_host()
    except Exception:  # some row is at fault: sample one by one, so that only it fails
        for generator, state in states:
            generator.set_state(state)
        return [_sample_one(logits[i : i + 1], row) for i, row in enumerate(rows)]


def _sample_one(logits: torch.Tensor, row: RowContext) -> tuple[int, TokenLogprobs] | SamplingError:
    try:
        return sample(logits, [row]).to_host()[0]
    except Exception as e:  # handed to the row's request, which fails alone
        return SamplingError(f"sampling failed: {e}")


def _min_p(scaled: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """``scaled`` (R, V) with each row's tokens below ``min_p`` x its top probability set to -inf
    (before top-k and top-p, in vLLM's order; the top token always stays)."""
    if not any(p.min_p for p in params):
        return scaled
    probs = scaled.softmax(-1)
    floor = probs.amax(-1, keepdim=True) * torch.tensor([p.min_p for p in params], device=scaled.device)[:, None]
    return scaled.masked_fill(probs < floor, float("-inf"))


def _top_k_top_p(scaled: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """``scaled`` (R, V) with everything outside each row's top-k and top-p nucleus set to -inf.

    The rows that filter are ranked among their ``NUCLEUS_CANDIDATES`` (or top-k) most likely
    tokens only: sorting the whole vocabulary cost 60 softmaxes per row on CPU and dominated a
    sampled step. A row whose top-p nucleus reaches beyond the candidates (a flat distribution)
    makes the step sort them in full; the result is the same either way."""
    vocab = scaled.shape[1]
    rows = [i for i, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1.0]
    if not rows:
        return scaled
    sub, sub_params = scaled[rows], [params[i] for i in rows]
    kept = _nucleus(sub, sub_params, NUCLEUS_CANDIDATES)
    if kept is None:
        kept = _nucleus(sub, sub_params, vocab)
    out = scaled.clone()
    out[rows] = kept
    return out


def _nucleus(scaled: torch.Tensor, params: Sequence[SamplingParams], width: int) -> torch.Tensor | None:
    """The top-k / top-p filter among each row's ``width`` (or top-k) most likely tokens; None
    when some row's nucleus may reach beyond them."""
    vocab, device = scaled.shape[1], scaled.device
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    width = min(vocab, max(width, *ks))
    if width < vocab:
        sorted_logits, order = scaled.topk(width, dim=-1)  # (R, W), most likely first
    else:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
    kth = torch.tensor([k or width for k in ks], device=device)[:, None]
    drop = sorted_logits < sorted_logits.gather(1, kth - 1)  # below the k-th largest (ties kept)
    masked = sorted_logits.masked_fill(drop, float("-inf"))
    # Probabilities as over the whole vocabulary: a top-k row's mass is its k tokens', another
    # row's is every token's (the candidates are then only part of it).
    has_k = torch.tensor([k > 0 for k in ks], device=device)[:, None]
    norm = torch.where(has_k, masked.logsumexp(-1, keepdim=True), scaled.logsumexp(-1, keepdim=True))
    probs = (masked - norm).exp()
    top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
    if width < vocab and bool((~has_k & (probs.sum(-1, keepdim=True) < top_p)).any()):
        return None
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
    drop |= before >= top_p  # keep the token that crosses p
    return torch.full_like(scaled, float("-inf")).scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))


def reference_logprobs(logits: torch.Tensor, row: RowContext) -> tuple[torch.Tensor, torch.Tensor]:
    """One row (V,): (log probabilities reported, the distribution sampled from). Tests only."""
    p = row.params
    lg = logits.double().clone()
    if p.repetition_penalty != 1.0:
        for t in set(row.prompt) | set(row.output):
            lg[t] = lg[t] / p.repetition_penalty if lg[t] > 0 else lg[t] * p.repetition_penalty
    for t in set(row.output):
        c = list(row.output).count(t)
        lg[t] -= p.frequency_penalty * c + p.presence_penalty
    for t, b in p.logit_bias.items():
        lg[t] += b
    if len(row.output) < p.min_tokens:
        for t in row.eos_ids | set(p.stop_token_ids):
            lg[t] = float("-inf")
    scaled = lg / (p.temperature or 1.0)
    if p.greedy:
        return scaled.log_softmax(0), torch.nn.functional.one_hot(lg.argmax(), lg.shape[0]).double()
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if p.min_p:
        probs = scaled.softmax(0)
        keep &= probs >= p.min_p * probs.max()
    if p.top_k and p.top_k < lg.shape[0]:
        keep &= scaled >= scaled.masked_fill(~keep, float("-inf")).topk(p.top_k).values[-1]
    if p.top_p < 1.0:
        probs = scaled.masked_fill(~keep, float("-inf")).softmax(0)
        ranked, order = probs.sort(descending=True)
        inside = (ranked.cumsum(0) - ranked) < p.top_p
        keep &= torch.zeros_like(keep).scatter(0, order, inside)
    return scaled.log_softmax(0), scaled.masked_fill(~keep, float("-inf")).softmax(0)
