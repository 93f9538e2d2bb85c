"""The paged engine against transformers and PEFT: prefix hits, preemption, lengths, no leaks."""

from __future__ import annotations

import asyncio
import random
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from engine_helpers import collect, hf_greedy, wait_until
from openlora_ray.engine.config import EngineConfig
from openlora_ray.engine.request import SamplingParams
from openlora_ray.errors import InvalidAdapterError

GREEDY = dict(temperature=0.0, ignore_eos=True)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def tiny_hf(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def peft_ref(tiny_model_dir, adapter_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()


async def settled(engine) -> None:
    """Nothing running or queued, every block back in the pool."""
    await wait_until(lambda: engine.stats.running == 0 and engine.stats.queue_depth == 0)
    await wait_until(lambda: engine.stats.free_kv_blocks == engine.stats.total_kv_blocks)


async def test_prefix_hits_skip_prefill_and_keep_greedy_tokens(engine_factory, tiny_model_dir, tiny_hf):
    engine = engine_factory(EngineConfig(model_path=tiny_model_dir, max_seq_len=160, kv_block_size=8, prefill_chunk=32))
    system = tokens(64, seed=1)
    prompts = [system + tokens(5 + i, seed=10 + i) for i in range(4)]
    params = SamplingParams(max_tokens=10, **GREEDY)
    first, _, _ = await collect(engine, engine.make_request(prompts[0], params=params))
    rest = await asyncio.gather(*(collect(engine, engine.make_request(p, params=params)) for p in prompts[1:]))
    for p, got in zip(prompts, [first] + [r[0] for r in rest]):
        assert got == hf_greedy(tiny_hf, p, 10, eos=None)
    base = engine.stats.prefix[""]
    assert base.hit_tokens == 3 * 64  # each later request reused the 8 blocks of the system prompt
    assert base.prompt_tokens == sum(len(p) for p in prompts)
    await settled(engine)
    assert engine.stats.cached_kv_blocks >= 8


async def test_choices_of_one_prompt_sent_together_share_its_blocks(engine_factory, tiny_model_dir):
    """OpenAI's ``n``: the serve layer sends ``n`` requests of one prompt at once (serve/
    openai_serving.py). They would fit one step's budget side by side; instead one prefills the
    prompt and the others wait a step and take its blocks from the prefix cache, all but the
    block of the last token (issue 15: choices share the prompt's KV blocks)."""
    config = EngineConfig(model_path=tiny_model_dir, max_seq_len=128, kv_block_size=8, prefill_chunk=256)
    engine = engine_factory(config)
    prompt = tokens(64, seed=11)
    params = [SamplingParams(max_tokens=4, temperature=1.0, seed=s) for s in range(4)]
    await asyncio.gather(*(collect(engine, engine.make_request(prompt, params=p)) for p in params))
    assert engine.stats.prefix[""].hit_tokens == 3 * 56 and engine.stats.prefix[""].prompt_tokens == 4 * 64

async def test_preemption_by_a_tiny_pool_loses_and_repeats_nothing(engine_factory, tiny_model_dir, tiny_hf):
    """Six long requests in a pool that holds about two: preempted streams pause and resume."""
    engine = engine_factory(
        EngineConfig(model_path=tiny_model_dir, max_seq_len=128, max_running=6, kv_block_size=4, num_kv_blocks=48, prefill_chunk=16)
    )
    prompts = [tokens(20 + 7 * i, seed=20 + i) for i in range(6)]
    params = [SamplingParams(max_tokens=40 + 3 * i, **GREEDY) for i in range(6)]
    results = await asyncio.wait_for(
        asyncio.gather(*(collect(engine, engine.make_request(p, params=q)) for p, q in zip(prompts, params))), 120
    )
    assert engine.stats.preemptions > 0
    for p, q, (got, _, last) in zip(prompts, params, results):
        assert got == hf_greedy(tiny_hf, p, q.max_tokens, eos=None)  # every token once, in order
        assert last.completion_tokens == q.max_tokens
    await settled(engine)


async def test_rows_of_very_different_lengths_share_a_batch(engine_factory, tiny_model_dir, tiny_hf):
    engine = engine_factory(EngineConfig(model_path=tiny_model_dir, max_seq_len=400, max_running=6, prefill_chunk=64))
    lengths = [1, 3, 17, 90, 200, 333]
    prompts = [tokens(n, seed=30 + n) for n in lengths]
    params = SamplingParams(max_tokens=12, **GREEDY)
    results = await asyncio.gather(*(collect(engine, engine.make_request(p, params=params)) for p in prompts))
    for p, (got, _, _) in zip(prompts, results):
        assert got == hf_greedy(tiny_hf, p, 12, eos=None)


async def test_adapters_with_prefix_hits_equal_peft_row_by_row(engine_factory, tiny_model_dir, make_adapter):
    dirs = {
        "alpha": make_adapter("pg-alpha", r=8, alpha=16.0, seed=51),
        "beta": make_adapter("pg-beta", r=4, alpha=6.0, targets=("q_proj", "v_proj", "down_proj"), seed=52),
    }
    engine = engine_factory(EngineConfig(model_path=tiny_model_dir, max_seq_len=128, max_rank=8, kv_block_size=8), dirs.__getitem__)
    system = tokens(40, seed=5)
    plan = [("alpha", 1), ("beta", 2), (None, 3), ("alpha", 4), ("beta", 5), (None, 6)]
    params = SamplingParams(max_tokens=8, **GREEDY)
    runs = []
    for _ in range(2):  # the second round hits the blocks the first one left, per adapter
        runs.append(
            await asyncio.gather(*(collect(engine, engine.make_request(system + tokens(4, s), a, params)) for a, s in plan))
        )
    refs = {a: peft_ref(tiny_model_dir, d) for a, d in dirs.items()} | {None: AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()}
    for results in runs:
        for (adapter, s), (got, _, _) in zip(plan, results):
            assert got == hf_greedy(refs[adapter], system + tokens(4, s), 8, eos=None), adapter
    assert all(engine.stats.prefix[a].hit_tokens >= 40 for a in ("alpha", "beta", ""))


async def test_prefix_cache_never_crosses_adapters_or_versions(engine_factory, tiny_model_dir, make_adapter, tmp_path):
    """The same prompt under v1, then v2 re-pushed under the same id, then the base model."""
    v1 = make_adapter("pg-ver-1", r=8, alpha=12.0, seed=61)
    v2 = make_adapter("pg-ver-2", r=8, alpha=12.0, seed=62)
    live = tmp_path / "support-bot"
    shutil.copytree(v1, live)
    engine = engine_factory(EngineConfig(model_path=tiny_model_dir, max_seq_len=96, max_rank=8, kv_block_size=4), lambda aid: live)
    prompt = tokens(33, seed=7)
    params = SamplingParams(max_tokens=10, **GREEDY)

    async def ask(adapter):
        return (await collect(engine, engine.make_request(prompt, adapter, params)))[0]

    assert await ask("support-bot") == hf_greedy(peft_ref(tiny_model_dir, v1), prompt, 10, eos=None)
    assert await ask("support-bot") == hf_greedy(peft_ref(tiny_model_dir, v1), prompt, 10, eos=None)
    assert engine.stats.prefix["support-bot"].hit_tokens == 32  # v1's blocks were reused by v1
    shutil.rmtree(live)
    shutil.copytree(v2, live)  # new weights under the very same adapter id
    await engine.evict("support-bot")
    assert await ask("support-bot") == hf_greedy(peft_ref(tiny_model_dir, v2), prompt, 10, eos=None)
    assert engine.stats.prefix["support-bot"].hit_tokens == 32  # nothing of v1's was read under v2
    assert await ask(None) == hf_greedy(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), prompt, 10, eos=None)
    assert engine.stats.prefix[""].hit_tokens == 0


async def test_seeded_soak_with_cancellations_preemptions_and_failures_leaks_no_block(engine_factory, tiny_model_dir, make_adapter, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 64, "lora_alpha": 8}')
    (bad / "adapter_model.safetensors").write_bytes(b"not safetensors")
    dirs = {"a": make_adapter("pg-soak-a", r=4, alpha=8.0, seed=71), "b": make_adapter("pg-soak-b", r=2, alpha=3.0, seed=72), "bad": bad}
    engine = engine_factory(
        EngineConfig(model_path=tiny_model_dir, max_seq_len=96, max_running=5, num_slots=2, max_rank=8, kv_block_size=4, num_kv_blocks=40, prefill_chunk=24),
        dirs.__getitem__,
    )
    rng = random.Random(3)
    system = tokens(16, seed=8)
    outcomes: list[str] = []

    async def one(i: int) -> None:
        await asyncio.sleep(rng.random() * 0.5)
        prompt = (system if rng.random() < 0.5 else []) + tokens(rng.randint(1, 40), seed=100 + i)
        adapter = rng.choice([None, "a", "b", "bad"])
        params = SamplingParams(max_tokens=rng.randint(1, 50), temperature=rng.choice([0.0, 0.8]), seed=i, ignore_eos=True)
        stream = engine.generate(engine.make_request(prompt, adapter, params))
        cancel_after = rng.choice([None, None, rng.randint(1, 10)])
        seen = 0
        try:
            async for _ in stream:
                seen += 1
                if cancel_after is not None and seen >= cancel_after:
                    outcomes.append("cancelled")
                    return
            outcomes.append("done")
        except InvalidAdapterError:
            outcomes.append("failed")
        finally:
            await stream.aclose()

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(40))), 180)
    assert {"cancelled", "done", "failed"} <= set(outcomes)
    assert engine.stats.preemptions > 0
    await settled(engine)
    assert all(engine.slots.pins(a) == 0 for a in ("a", "b"))


async def test_logprobs_are_the_models_own_log_softmax(engine_factory, tiny_model_dir, tiny_hf):
    engine = engine_factory(EngineConfig(model_path=tiny_model_dir, max_seq_len=64))
    prompt = tokens(11, seed=9)
    params = SamplingParams(max_tokens=6, logprobs=3, **GREEDY)
    got, logprobs = [], []
    async for out in engine.generate(engine.make_request(prompt, params=params)):
        got += out.token_ids
        logprobs += out.logprobs
    assert len(logprobs) == len(got) == 6
    with torch.no_grad():
        ref = tiny_hf(torch.tensor([prompt + got])).logits[0, len(prompt) - 1 : -1].log_softmax(-1)  # (6, V)
    for i, (token, lp) in enumerate(zip(got, logprobs)):
        assert lp.top[0][0] == token  # greedy: the top-1
        assert lp.token_logprob == pytest.approx(float(ref[i, token]), abs=1e-4)
        assert [t for t, _ in lp.top] == ref[i].topk(3).indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(ref[i].topk(3).values.tolist(), abs=1e-4)


async def test_a_slow_reader_gets_increments_merged_and_nothing_lost(engine_factory, tiny_model_dir, tiny_hf):
    engine = engine_factory(EngineConfig(model_path=tiny_model_dir, max_seq_len=64))
    prompt = tokens(7, seed=11)
    items, got = 0, []
    async for out in engine.generate(engine.make_request(prompt, params=SamplingParams(max_tokens=30, **GREEDY))):
        items += 1
        got += out.token_ids
        await asyncio.sleep(0.05)  # a busy caller: tokens pile up meanwhile
    assert got == hf_greedy(tiny_hf, prompt, 30, eos=None)
    assert items < 30
