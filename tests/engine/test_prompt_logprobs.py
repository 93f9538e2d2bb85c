"""The prompt's own log probabilities (``prompt_logprobs``) against transformers and PEFT."""

from __future__ import annotations

import asyncio

import torch
from engine_helpers import collect
from peft import PeftModel
from transformers import AutoModelForCausalLM

from openlora_ray.engine.config import EngineConfig
from openlora_ray.engine.request import SamplingParams


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference(model: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    """log_softmax of one full-sequence forward: row i scores token i + 1."""
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)


def assert_scores(got, prompt: list[int], want: torch.Tensor, k: int) -> None:
    assert len(got) == len(prompt) and got[0] is None
    for p in range(1, len(prompt)):
        row = want[p - 1]
        assert abs(got[p].token_logprob - float(row[prompt[p]])) < 1e-4, p
        assert got[p].rank == 1 + int((row > row[prompt[p]]).sum()), p  # vLLM's Logprob.rank
        top = row.topk(k)
        assert [t for t, _ in got[p].top] == top.indices.tolist(), p
        assert all(abs(v - float(w)) < 1e-4 for (_, v), w in zip(got[p].top, top.values, strict=True))


async def test_chunked_prompt_scores_equal_the_full_forward_despite_a_cached_prefix(engine_factory, tiny_model_dir):
    """A 50-token prompt prefilled in 16-token chunks whose blocks another request left in the
    prefix cache: scoring it takes no hit (it needs every position's logits) and, with
    ``max_tokens`` 0, answers the prompt alone (lm-eval-harness's loglikelihood request)."""
    engine = engine_factory(EngineConfig(model_path=tiny_model_dir, max_seq_len=96, kv_block_size=8, prefill_chunk=16))
    prompt = tokens(50, seed=3)
    await collect(engine, engine.make_request(prompt, params=SamplingParams(max_tokens=2, temperature=0.0)))
    hits = engine.stats.prefix[""].hit_tokens
    request = engine.make_request(prompt, params=SamplingParams(max_tokens=0, prompt_logprobs=3))
    got, text, last = await collect(engine, request)
    assert got == [] and text == "" and last.finish_reason == "length" and last.completion_tokens == 0
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert_scores(last.prompt_logprobs, prompt, reference(hf, prompt), k=3)
    assert engine.stats.prefix[""].hit_tokens == hits
    # Generation goes on after the prompt: its scores come once, on the first increment.
    params = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=0, ignore_eos=True)
    outs = [o async for o in engine.generate(engine.make_request(prompt, params=params))]
    assert len(outs[0].prompt_logprobs) == len(prompt) and all(not o.prompt_logprobs for o in outs[1:])
    assert sum(len(o.token_ids) for o in outs) == 4
    assert engine.stats.prefix[""].hit_tokens == hits


async def test_prompt_scores_through_an_adapter_equal_peft(engine_factory, tiny_model_dir, make_adapter):
    """An adapter with non-zero B and alpha != r, beside a base-model request in the same steps."""
    adapter = make_adapter("pl-alpha", r=4, alpha=10.0, seed=81)
    engine = engine_factory(
        EngineConfig(model_path=tiny_model_dir, max_seq_len=96, max_rank=8, kv_block_size=8, prefill_chunk=24),
        {"a": adapter}.__getitem__,
    )
    prompt, other = tokens(40, seed=4), tokens(30, seed=5)
    params = SamplingParams(max_tokens=0, prompt_logprobs=2)
    (_, _, with_adapter), (_, _, base) = await asyncio.gather(
        collect(engine, engine.make_request(prompt, "a", params)),
        collect(engine, engine.make_request(other, None, params)),
    )
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), adapter)
    assert_scores(with_adapter.prompt_logprobs, prompt, reference(peft.eval(), prompt), k=2)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert_scores(base.prompt_logprobs, other, reference(hf, other), k=2)
    plain = reference(hf, prompt)
    scores = with_adapter.prompt_logprobs
    assert max(abs(s.token_logprob - float(plain[p - 1, prompt[p]])) for p, s in enumerate(scores) if s) > 1e-3
