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

Greedy rows equal ``generate(do_sample=False)`` (same repetition-penalty rule). The penalties and
the bias are applied as sparse edits over the tokens each row has seen (not over rows x
vocabulary). A sampled row inverts its filtered distribution's cumulative sum at one uniform
number from its own seeded generator when it has one, so a seeded request repeats its tokens
whatever else shares its batch. Everything stays on the device; the step copies to the host once
(``SampledBatch.to_host``).
"""

from __future__ import annotations

import math
from collections import Counter
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


def _sparse_edits(rows: Sequence[RowContext]) -> tuple[list[tuple[int, int, float]], list[tuple[int, int, float]]]:
    """The (row, token, value) edits of the penalties and the bias, computed on the host.

    Every penalty touches only tokens a row has seen, so the edits are as many as those tokens,
    not rows x vocabulary: repetition penalties (row, token, penalty) over the prompt and output's
    distinct tokens, then the additive frequency/presence penalties and ``logit_bias`` as
    (row, token, delta) summed into the logits."""
    rep, add = [], []
    for i, r in enumerate(rows):
        p = r.params
        if p.repetition_penalty != 1.0:
            rep += [(i, t, p.repetition_penalty) for t in set(r.prompt).union(r.output)]
        if p.frequency_penalty or p.presence_penalty:
            add += [(i, t, -(p.frequency_penalty * c + p.presence_penalty)) for t, c in Counter(r.output).items()]
        add += [(i, t, b) for t, b in p.logit_bias.items()]
        if len(r.output) < p.min_tokens:
            add += [(i, t, float("-inf")) for t in r.eos_ids | set(p.stop_token_ids)]
    return rep, add


def _edit_index(
    edits: list[tuple[int, int, float]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S,) rows, (S,) tokens and (S,) float32 values of ``edits``, on ``device``."""
    rows, tokens, values = zip(*edits)
    return (
        torch.tensor(rows, device=device),
        torch.tensor(tokens, device=device),
        torch.tensor(values, dtype=torch.float32, device=device),
    )


def process_logits(logits: torch.Tensor, rows: Sequence[RowContext]) -> torch.Tensor:
    """Penalties, bias, min_tokens and output constraints applied to ``logits`` (B, V), as float32.

    ``logits`` itself is never written: a batch without any of these settings gets it back as it
    is (no copy), any other a float32 copy with the edits."""
    rep, add = _sparse_edits(rows)
    constrained = any(r.constraint is not None for r in rows)
    if not (rep or add or constrained):
        return logits.float()
    logits = logits.to(torch.float32, copy=True)
    if rep:
        r, t, penalty = _edit_index(rep, logits.device)  # (S,) each
        seen = logits[r, t]
        logits[r, t] = torch.where(seen > 0, seen / penalty, seen * penalty)
    if add:  # -inf (min_tokens) plus any bias stays -inf
        r, t, delta = _edit_index(add, logits.device)
        logits.index_put_((r, t), delta, accumulate=True)
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
    """One token per row of ``logits`` (B, V), with its log probability and the top alternatives.

    Log probabilities are computed only when some row of the batch asked for them (the others'
    entries are then computed alongside, and ignored by the engine)."""
    processed = process_logits(logits, rows)  # (B, V) float32
    device = processed.device
    temps = [r.params.temperature or 1.0 for r in rows]
    scaled = processed if all(t == 1.0 for t in temps) else processed / torch.tensor(temps, device=device)[:, None]
    greedy = [i for i, r in enumerate(rows) if r.params.greedy]
    sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
    chosen = torch.empty(len(rows), dtype=torch.long, device=device)  # (B,)
    if greedy:
        chosen[greedy] = _rows(processed, greedy).argmax(-1)
    if sampled:
        chosen[sampled] = _choose(_rows(scaled, sampled), [rows[i] for i in sampled])
    parts = [chosen[:, None].double()]
    k = 0
    if any(r.params.logprobs is not None for r in rows):
        k = max(r.params.logprobs or 0 for r in rows)
        norm = scaled.logsumexp(-1, keepdim=True)  # (B, 1)
        parts.append((scaled.gather(1, chosen[:, None]) - norm).double())
        if k:
            top = scaled.topk(k, dim=-1)
            parts += [top.indices.double(), (top.values - norm).double()]
    else:
        parts.append(torch.full_like(parts[0], float("nan")))
    return SampledBatch(torch.cat(parts, dim=1), k)


def _choose(scaled: torch.Tensor, rows: Sequence[RowContext]) -> torch.Tensor:
    """One token per sampled row of ``scaled`` (R, V): min_p, then top-k / top-p, then the draw.

    A row that filters by top-k or top-p is drawn among its candidates only (``_top_k_top_p``),
    the others over the whole vocabulary; either way its tokens are taken in token-id order, so a
    row draws the same token for the same number whichever way it was filtered."""
    params = [r.params for r in rows]
    u = _uniforms([r.generator for r in rows], scaled.device)  # (R,)
    scaled = _min_p(scaled, params)
    vocab = scaled.shape[1]
    filters = [0 < p.top_k < vocab or p.top_p < 1.0 for p in params]
    filtering = [j for j, f in enumerate(filters) if f]
    whole = [j for j, f in enumerate(filters) if not f]
    chosen = torch.empty(len(params), dtype=torch.long, device=scaled.device)  # (R,)
    if whole:
        chosen[whole] = _invert_cdf(_rows(scaled, whole), u[whole])
    if filtering:
        kept, ids = _top_k_top_p(_rows(scaled, filtering), [params[j] for j in filtering])  # (F, W) each
        ids, order = ids.sort(dim=-1)  # candidates in token-id order
        chosen[filtering] = ids.gather(1, _invert_cdf(kept.gather(1, order), u[filtering])[:, None])[:, 0]
    return chosen


def _rows(t: torch.Tensor, which: list[int]) -> torch.Tensor:
    """``t[which]``: ``t`` itself when ``which`` is every row in order (no copy), else a block copy
    (``index_select``: advanced indexing of (rows, vocabulary) took several times longer on CPU)."""
    if which == list(range(len(t))):
        return t
    return t.index_select(0, torch.tensor(which, device=t.device))


def _uniforms(generators: Sequence[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """(R,) uniform numbers in [0, 1): a seeded row's from its own generator, so it repeats its
    draws whatever else shares its batch; the others' from the default generator."""
    u = torch.empty(len(generators), device=device)
    unseeded = [j for j, g in enumerate(generators) if g is None]
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded), device=device)
    for j, g in enumerate(generators):
        if g is not None:
            u[j] = torch.rand(1, generator=g, device=device)[0]
    return u


def _invert_cdf(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The column of each row of ``logits`` (R, W) drawn from its softmax at the uniform ``u`` (R,):
    the first column whose cumulative probability passes ``u``.

    One number per row, not one per token (as the exponential race ``argmax(p / E)`` or
    ``torch.multinomial`` draw): generating a vocabulary's worth of noise per row was the
    costliest part of a sampled step."""
    cdf = logits.softmax(-1).cumsum(-1)  # (R, W)
    # u x the total (not 1: rounding), searched to the right: never a column of probability 0.
    chosen = torch.searchsorted(cdf, (u[:, None] * cdf[:, -1:]).contiguous(), right=True)  # (R, 1)
    return chosen[:, 0].clamp_(max=logits.shape[1] - 1)


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
    (before top-k and top-p, in vLLM's order; the top token always stays). Compared as logits:
    ``p >= min_p x p_max`` is ``l >= l_max + log(min_p)``, so no softmax is needed."""
    if not any(p.min_p for p in params):
        return scaled
    floor = torch.tensor([math.log(p.min_p) if p.min_p else -math.inf for p in params], device=scaled.device)
    return scaled.masked_fill(scaled < scaled.amax(-1, keepdim=True) + floor[:, None], float("-inf"))


def _top_k_top_p(scaled: torch.Tensor, params: Sequence[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's top-k and top-p nucleus of ``scaled`` (R, V): (R, W) logits of its candidates
    (the dropped ones -inf) and (R, W) their token ids.

    The rows are ranked among their ``NUCLEUS_CANDIDATES`` (or top-k) most likely tokens only:
    sorting the whole vocabulary cost 60 softmaxes per row on CPU and dominated a sampled step. A
    row whose top-p nucleus reaches beyond the candidates (a flat distribution) makes the step
    sort them in full; the tokens kept are the same either way."""
    return _nucleus(scaled, params, NUCLEUS_CANDIDATES) or _nucleus(scaled, params, scaled.shape[1])


def _nucleus(
    scaled: torch.Tensor, params: Sequence[SamplingParams], width: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
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
    norm = masked.logsumexp(-1, keepdim=True)  # (R, 1)
    unbounded = [j for j, k in enumerate(ks) if not k]
    if unbounded:
        norm[unbounded] = _rows(scaled, unbounded).logsumexp(-1, keepdim=True)
    probs = (masked - norm).exp()
    top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
    if width < vocab and unbounded and bool((probs[unbounded].sum(-1, keepdim=True) < top_p[unbounded]).any()):
        return None
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
    drop |= before >= top_p  # keep the token that crosses p
    return sorted_logits.masked_fill(drop, float("-inf")), order


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
