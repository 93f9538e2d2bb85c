"""The batched sampler against its one-row reference, and seeded draws in any batch."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openlora_ray.engine.request import SamplingParams
from openlora_ray.engine.sampling import (
    RowContext,
    SamplingError,
    _min_p,
    _top_k_top_p,
    process_logits,
    reference_logprobs,
    sample,
    sample_rows,
)

V = 50
EOS = frozenset({2})


def random_row(rng: random.Random) -> RowContext:
    greedy = rng.random() < 0.3
    params = SamplingParams(
        temperature=0.0 if greedy else rng.choice([0.5, 1.0, 1.7]),
        top_k=rng.choice([0, 0, 1, 5, 30]),
        top_p=rng.choice([1.0, 1.0, 0.9, 0.5]),
        min_p=rng.choice([0.0, 0.0, 0.05, 0.3]),
        repetition_penalty=rng.choice([1.0, 1.0, 1.3, 0.8]),
        frequency_penalty=rng.choice([0.0, 0.5, -0.3]),
        presence_penalty=rng.choice([0.0, 0.7]),
        logit_bias={rng.randrange(V): rng.choice([-100.0, 5.0, 0.5]) for _ in range(rng.randint(0, 3))},
        min_tokens=rng.choice([0, 0, 3]),
        logprobs=rng.choice([None, 0, 3]),
    )
    prompt = [rng.randrange(V) for _ in range(rng.randint(1, 8))]
    output = [rng.randrange(V) for _ in range(rng.randint(0, 6))]
    return RowContext(params, torch.Generator().manual_seed(rng.randrange(1000)), prompt, output, EOS)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10**6))
def test_batched_logits_and_logprobs_equal_the_one_row_reference(seed):
    rng = random.Random(seed)
    rows = [random_row(rng) for _ in range(rng.randint(1, 6))]
    logits = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(seed))
    processed = process_logits(logits, rows)
    batch = sample(logits, rows).to_host()
    for i, row in enumerate(rows):
        want_logprobs, want_dist = reference_logprobs(logits[i], row)
        got = (processed[i] / (row.params.temperature or 1.0)).log_softmax(0)
        torch.testing.assert_close(got.double(), want_logprobs, rtol=1e-5, atol=1e-5, equal_nan=True)
        token, lp = batch[i]
        assert want_dist[token] > 0  # drawn from the filtered distribution (greedy: its argmax)
        if row.params.logprobs is None:
            continue  # computed only for the rows that ask
        assert lp.token_logprob == pytest.approx(float(want_logprobs[token]), abs=1e-5)
        k = row.params.logprobs or 0
        assert [t for t, _ in lp.top[:k]] == want_logprobs.topk(k).indices.tolist() if k else True


@pytest.mark.parametrize("spread", [1.0, 6.0])  # flat: the nucleus needs a full sort; peaked: the candidates hold it
def test_filters_over_a_large_vocabulary_keep_what_the_reference_keeps(spread):
    rng = random.Random(int(spread))
    vocab = 3000
    params = [
        SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m)
        for t, k, p, m in [(1.0, 0, 0.9, 0.0), (0.7, 50, 1.0, 0.0), (1.3, 400, 0.8, 0.0), (1.0, 0, 0.95, 0.02), (1.0, 0, 1.0, 0.0)]
    ]
    logits = torch.randn(len(params), vocab, generator=torch.Generator().manual_seed(rng.randrange(100))) * spread
    rows = [RowContext(p, None, [0], [], EOS) for p in params]
    scaled = logits / torch.tensor([p.temperature for p in params])[:, None]
    filtering = [i for i, p in enumerate(params) if p.top_k or p.top_p < 1.0]
    candidates, ids = _top_k_top_p(_min_p(scaled, params)[filtering], [params[i] for i in filtering])
    kept = torch.isfinite(_min_p(scaled, params))  # a row that does not filter keeps what min_p keeps
    kept[filtering] = torch.zeros_like(kept[filtering]).scatter(1, ids, torch.isfinite(candidates))
    for i, row in enumerate(rows):
        _, want = reference_logprobs(logits[i], row)
        assert torch.equal(kept[i], want > 0), (spread, params[i])


def test_draws_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    row = RowContext(SamplingParams(temperature=1.0, top_p=0.8), None, [0], [], EOS)
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[sample(logits, [row]).to_host()[0][0]] += 1
    assert counts[2] == counts[3] == 0  # outside the 0.8 nucleus
    assert counts[0] / counts[:2].sum() == pytest.approx(0.5 / 0.8, abs=0.03)


def test_min_p_drops_tokens_below_its_share_of_the_top_probability_per_row():
    """vLLM's min_p 0.4 with a top probability of 0.5: only tokens of at least 0.2 are drawn,
    while the row beside it, without min_p, still draws every token."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2, 1)
    rows = [
        RowContext(SamplingParams(temperature=1.0, min_p=0.4), torch.Generator().manual_seed(1), [0], [], EOS),
        RowContext(SamplingParams(temperature=1.0), torch.Generator().manual_seed(2), [0], [], EOS),
    ]
    counts = torch.zeros(2, 4)
    for _ in range(3000):
        for i, (token, _) in enumerate(sample(logits, rows).to_host()):
            counts[i, token] += 1
    assert counts[0, 2] == counts[0, 3] == 0
    assert counts[0, 0] / counts[0].sum() == pytest.approx(0.5 / 0.8, abs=0.03)
    assert counts[1, 2] > 0 and counts[1, 3] > 0
    assert counts[1, 0] / counts[1].sum() == pytest.approx(0.5, abs=0.03)


def test_a_seeded_row_draws_the_same_tokens_in_any_batch():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1))

    def row(seed):
        return RowContext(SamplingParams(temperature=1.0, seed=seed), torch.Generator().manual_seed(seed), [1], [], EOS)

    alone = [sample(logits[2:3], [row(7)]).to_host()[0][0] for _ in range(3)]
    mixed = [sample(logits, [row(1), row(2), row(7), row(3)]).to_host()[2][0] for _ in range(3)]
    assert len(set(alone)) == 1 and alone == mixed


def test_min_tokens_masks_eos_and_greedy_follows_hf_repetition_penalty():
    logits = torch.tensor([[1.0, 0.0, 9.0, 1.0, 2.0]])
    early = RowContext(SamplingParams(temperature=0.0, min_tokens=2), None, [0], [4], EOS)
    assert sample(logits, [early]).to_host()[0][0] == 4
    late = RowContext(SamplingParams(temperature=0.0, min_tokens=2, repetition_penalty=10.0), None, [2], [4, 3], EOS)
    assert sample(logits, [late]).to_host()[0][0] == 0  # 9/10 < 1: the penalised EOS loses to an unseen token


def test_a_row_whose_sampling_fails_fails_alone():
    """On a GPU a generator on the wrong device failed the whole batch; now only its row."""
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(2))
    good = RowContext(SamplingParams(temperature=1.0, seed=1), torch.Generator().manual_seed(1), [1], [], EOS)
    broken = RowContext(SamplingParams(temperature=1.0, seed=2), "not a generator", [1], [], EOS)
    greedy = RowContext(SamplingParams(temperature=0.0), None, [1], [], EOS)
    out = sample_rows(logits, [good, broken, greedy])
    assert isinstance(out[1], SamplingError) and "sampling failed" in str(out[1])
    assert out[2][0] == int(logits[2].argmax())
    assert out[0][0] == sample(logits[:1], [RowContext(good.params, torch.Generator().manual_seed(1), [1], [], EOS)]).to_host()[0][0]
