"""The engine against transformers and PEFT, token for token, under continuous batching."""

from __future__ import annotations

import asyncio

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from engine_helpers import collect, hf_greedy, wait_until
from openlora_ray.engine.config import EngineConfig
from openlora_ray.engine.request import SamplingParams
from openlora_ray.errors import AdapterNotFoundError, CapacityError, InvalidAdapterError, InvalidRequestError

GREEDY = dict(temperature=0.0)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (int(torch.randint(3, 20, (1,), generator=gen)),), generator=gen).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_hf(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


async def test_greedy_alone_equals_transformers_generate(engine_factory, tiny_model_dir, tiny_hf):
    engine = engine_factory(EngineConfig(model_path=tiny_model_dir, max_seq_len=64))
    prompt = prompts(1)[0]
    tokens, _, last = await collect(engine, engine.make_request(prompt, params=SamplingParams(max_tokens=20, **GREEDY)))
    assert tokens == hf_greedy(tiny_hf, prompt, 20, eos=2)
    assert last.prompt_tokens == len(prompt) and last.completion_tokens == len(tokens)
    assert last.finish_reason == ("stop" if tokens[-1] == 2 else "length")


async def test_requests_joining_and_leaving_keep_their_tokens(engine_factory, tiny_model_dir, tiny_hf):
    """Rows join at different steps, finish at different steps, and prefill in chunks."""
    engine = engine_factory(EngineConfig(model_path=tiny_model_dir, max_seq_len=64, max_running=4, prefill_chunk=7))
    ps = prompts(6, seed=1)
    lengths = [18, 5, 12, 9, 16, 3]

    async def run(i: int, delay_steps: int):
        await wait_until(lambda: engine.stats.steps >= delay_steps)
        return await collect(engine, engine.make_request(ps[i], params=SamplingParams(max_tokens=lengths[i], ignore_eos=True, **GREEDY)))

    results = await asyncio.wait_for(asyncio.gather(*(run(i, 3 * i) for i in range(6))), 60)
    for i, (tokens, _, last) in enumerate(results):
        want = hf_greedy(tiny_hf, ps[i], lengths[i], eos=None)
        assert tokens == want, f"request {i}"
        assert last.finish_reason == "length" and last.completion_tokens == lengths[i]
    await wait_until(lambda: engine.stats.running == 0 and engine.stats.free_kv_blocks == engine.stats.total_kv_blocks)


@pytest.mark.parametrize("eviction_half_life_s", [0.0, 300.0])  # LRU, and eviction by request counts
async def test_adapters_in_one_batch_equal_peft_merged(
    engine_factory, tiny_model_dir, make_adapter, eviction_half_life_s
):
    specs = {
        "alpha": dict(r=8, alpha=16.0, seed=41),
        "beta": dict(r=4, alpha=6.0, targets=("q_proj", "v_proj"), seed=42),
        "gamma": dict(r=2, alpha=5.0, targets=("gate_proj", "down_proj", "o_proj"), seed=43, use_rslora=True),
    }
    dirs = {name: make_adapter(f"eng-{name}", **kw) for name, kw in specs.items()}
    cfg = EngineConfig(
        model_path=tiny_model_dir, max_seq_len=64, num_slots=2, max_rank=8,
        slot_eviction_half_life_s=eviction_half_life_s,
    )
    engine = engine_factory(cfg, dirs.__getitem__)
    ps = prompts(5, seed=2)
    plan = [("alpha", ps[0]), (None, ps[1]), ("beta", ps[2]), ("gamma", ps[3]), ("alpha", ps[4])]
    results = await asyncio.wait_for(
        asyncio.gather(*(collect(engine, engine.make_request(p, a, SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY))) for a, p in plan)), 60
    )
    for (adapter, prompt), (tokens, _, _) in zip(plan, results):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        ref = PeftModel.from_pretrained(base, dirs[adapter]).merge_and_unload().eval() if adapter else base.eval()
        assert tokens == hf_greedy(ref, prompt, 12, eos=None), adapter
    assert len(set(tuple(r[0]) for r in results)) == 5  # adapters changed the outputs
    # Three adapters through two slots: one was evicted to the host tier on the way.
    assert len(engine.stats.resident_adapters) == 2 and len(engine.stats.host_adapters) >= 1
    assert (engine.slots.requests is None) == (eviction_half_life_s == 0)
    if engine.slots.requests is not None:  # the three adapters' requests were counted
        assert len(engine.slots.requests) == 3


async def test_seeded_sampling_reproduces_its_tokens_in_any_batch(engine_factory, tiny_model_dir):
    engine = engine_factory(EngineConfig(model_path=tiny_model_dir, max_seq_len=64))
    prompt = prompts(1, seed=3)[0]
    params = SamplingParams(max_tokens=15, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone, _, _ = await collect(engine, engine.make_request(prompt, params=params))
    others = [collect(engine, engine.make_request(p, params=SamplingParams(max_tokens=10, temperature=1.0, seed=i))) for i, p in enumerate(prompts(3, seed=4))]
    batched, *_ = await asyncio.gather(collect(engine, engine.make_request(prompt, params=params)), *others)
    assert batched[0] == alone
    other_seed, _, _ = await collect(engine, engine.make_request(prompt, params=params.model_copy(update={"seed": 99})))
    assert other_seed != alone


async def test_repetition_penalty_changes_greedy_output(engine_factory, tiny_model_dir):
    engine = engine_factory(EngineConfig(model_path=tiny_model_dir, max_seq_len=64))
    prompt = prompts(1, seed=5)[0]
    plain, _, _ = await collect(engine, engine.make_request(prompt, params=SamplingParams(max_tokens=20, ignore_eos=True, **GREEDY)))
    penalised, _, _ = await collect(engine, engine.make_request(prompt, params=SamplingParams(max_tokens=20, ignore_eos=True, repetition_penalty=5.0, **GREEDY)))
    assert penalised != plain
    assert len(set(penalised)) >= len(set(plain))


async def test_cancelling_a_stream_frees_its_row_and_pin(engine_factory, tiny_model_dir, make_adapter):
    path = make_adapter("eng-cancel", r=4, alpha=8.0, seed=44)
    engine = engine_factory(EngineConfig(model_path=tiny_model_dir, max_seq_len=512, max_running=2), {"cancel-me": path}.__getitem__)
    stream = engine.generate(engine.make_request(prompts(1)[0], "cancel-me", SamplingParams(max_tokens=400, ignore_eos=True)))
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 3:
            break
    await stream.aclose()
    await wait_until(lambda: engine.stats.running == 0 and engine.stats.free_kv_blocks == engine.stats.total_kv_blocks)
    assert engine.slots.pins("cancel-me") == 0 and "cancel-me" in engine.stats.resident_adapters


async def test_queue_overflow_fails_fast_and_kv_exhaustion_queues(engine_factory, tiny_model_dir, tiny_hf):
    engine = engine_factory(EngineConfig(model_path=tiny_model_dir, max_seq_len=128, max_running=2, max_queue=2))
    ps = prompts(4, seed=6)
    params = SamplingParams(max_tokens=30, ignore_eos=True, **GREEDY)
    tasks = [asyncio.create_task(collect(engine, engine.make_request(p, params=params))) for p in ps]
    await wait_until(lambda: engine.stats.queue_depth == 2 and engine.stats.running == 2)
    with pytest.raises(CapacityError, match="queue is full"):
        await collect(engine, engine.make_request(ps[0], params=params))
    results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    for p, (tokens, _, _) in zip(ps, results):  # the queued ones ran later, uncorrupted
        assert tokens == hf_greedy(tiny_hf, p, 30, eos=None)


async def test_a_bad_adapter_fails_only_its_own_request(engine_factory, tiny_model_dir, make_adapter, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 64, "lora_alpha": 8}')
    (bad / "adapter_model.safetensors").write_bytes(b"not safetensors")
    dirs = {"good": make_adapter("eng-good", r=4, alpha=8.0, seed=45), "bad": bad}

    def resolve(adapter_id: str):
        if adapter_id not in dirs:
            raise AdapterNotFoundError(adapter_id, "the test store")
        return dirs[adapter_id]

    engine = engine_factory(EngineConfig(model_path=tiny_model_dir, max_seq_len=64, max_rank=8), resolve)
    params = SamplingParams(max_tokens=25, ignore_eos=True, **GREEDY)
    good = asyncio.create_task(collect(engine, engine.make_request(prompts(1)[0], "good", params)))
    with pytest.raises(InvalidAdapterError, match="rank 64 exceeds"):
        await collect(engine, engine.make_request(prompts(1)[0], "bad", params))
    with pytest.raises(AdapterNotFoundError, match="'missing' not found in the test store"):
        await collect(engine, engine.make_request(prompts(1)[0], "missing", params))
    tokens, _, last = await asyncio.wait_for(good, 30)
    assert len(tokens) == 25 and last.finish_reason == "length"
    await wait_until(lambda: engine.stats.running == 0)  # stats are published after each step
    assert "bad" not in engine.stats.resident_adapters


async def test_oversize_and_empty_requests_are_refused(engine_factory, tiny_model_dir):
    engine = engine_factory(EngineConfig(model_path=tiny_model_dir, max_seq_len=32))
    with pytest.raises(InvalidRequestError, match="exceeds this server's context of 32"):
        await collect(engine, engine.make_request(list(range(3, 23)), params=SamplingParams(max_tokens=20)))
    with pytest.raises(InvalidRequestError, match="empty"):
        await collect(engine, engine.make_request([], params=SamplingParams()))
    with pytest.raises(InvalidRequestError, match="token ids must be in"):
        engine.make_request([5, 999])
