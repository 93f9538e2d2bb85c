"""SlotManager: LRU eviction, pins, the host tier, and the outputs after each move."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openlora_ray.errors import CapacityError, OpenLoraError
from openlora_ray.lora.ops import NO_ADAPTER
from openlora_ray.lora.slots import HostCache, RequestCounts, SlotManager, SlotState, choose_slot
from openlora_ray.lora.weights import LoraWeights, load_lora_weights
from openlora_ray.model.loader import load_multi_lora_model


def test_choose_slot_prefers_free_then_lru_unpinned():
    assert choose_slot([SlotState("a", 0, 5), SlotState(None, 0, 0), SlotState(None, 0, 0)]) == 1
    assert choose_slot([SlotState("a", 0, 5), SlotState("b", 0, 2), SlotState("c", 1, 1)]) == 1
    assert choose_slot([SlotState("a", 1, 5), SlotState("b", 2, 2)]) is None


def _fake_weights(adapter_id: str, nbytes: int) -> LoraWeights:
    return LoraWeights(adapter_id, 1, {(0, "q_proj"): (torch.zeros(nbytes // 2, dtype=torch.uint8), torch.zeros(nbytes - nbytes // 2, dtype=torch.uint8))}, digest=adapter_id)


def test_host_cache_is_lru_under_a_byte_budget():
    cache = HostCache(budget_bytes=100)
    for name in "abc":
        cache.put(_fake_weights(name, 40))
    assert cache.ids() == ["b", "c"] and cache.nbytes == 80
    cache.get("b")
    cache.put(_fake_weights("d", 40))
    assert cache.ids() == ["b", "d"]
    cache.put(_fake_weights("huge", 101))  # larger than the budget: not kept, nothing dropped
    assert cache.ids() == ["b", "d"]


@pytest.fixture()
def real(tiny_model_dir, make_adapter):
    model = load_multi_lora_model(tiny_model_dir, num_slots=2, max_rank=8, dtype=torch.float32)
    dirs = {
        "a": make_adapter("a", r=8, alpha=16.0, seed=21),
        "b": make_adapter("b", r=4, alpha=6.0, targets=("q_proj", "v_proj", "down_proj"), seed=22),
        "c": make_adapter("c", r=2, alpha=5.0, targets=("o_proj", "up_proj"), seed=23),
    }
    fetched: list[str] = []

    def fetch(adapter_id: str) -> LoraWeights:
        fetched.append(adapter_id)
        # Keyed by the adapter's name here, so the slot mechanics read plainly (the tiers key by digest).
        weights = load_lora_weights(adapter_id, dirs[adapter_id], model.dims, model.max_rank, model.dtype)
        return dataclasses.replace(weights, digest=adapter_id)

    return model, fetch, fetched


TOKENS = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(3))
POS = torch.arange(7)[None]


@torch.inference_mode()
def _logits(model, slot: int) -> torch.Tensor:
    return model(TOKENS, POS, model.lora_batch([slot]))[0]


def test_load_evict_reload_unload_keeps_outputs_right(real):
    model, fetch, fetched = real
    mgr = SlotManager(model, host_cache_bytes=10**9)
    slot_a = mgr.acquire("a", fetch)
    want_a = _logits(model, slot_a)
    slot_b = mgr.acquire("b", fetch)
    want_b = _logits(model, slot_b)
    mgr.release("a")
    mgr.release("b")
    mgr.acquire("b", fetch)  # b is now the most recently used
    mgr.release("b")
    slot_c = mgr.acquire("c", fetch)  # evicts a (LRU), not b
    assert slot_c == slot_a and mgr.resident() == ["b", "c"] and mgr.host.ids() == ["a"]
    want_c = _logits(model, slot_c)
    mgr.release("c")
    slot_a2 = mgr.acquire("a", fetch)  # from the host tier: no fetch; evicts b (LRU)
    assert fetched == ["a", "b", "c"] and mgr.host.ids() == ["b"]
    torch.testing.assert_close(_logits(model, slot_a2), want_a, rtol=0, atol=0)
    mgr.release("a")
    torch.testing.assert_close(_logits(model, mgr.acquire("b", fetch)), want_b, rtol=0, atol=0)  # evicts c
    torch.testing.assert_close(_logits(model, mgr.acquire("c", fetch)), want_c, rtol=0, atol=0)  # evicts a
    assert fetched == ["a", "b", "c"] and mgr.host.ids() == ["a"]
    assert not torch.allclose(want_a, want_b) and not torch.allclose(want_b, want_c)


def test_unload_frees_the_slot_for_real(real):
    model, fetch, _ = real
    mgr = SlotManager(model, host_cache_bytes=10**9)
    slot = mgr.acquire("a", fetch)
    with pytest.raises(OpenLoraError, match="in use"):
        mgr.unload("a")
    mgr.release("a")
    mgr.unload("a")
    assert mgr.free_slots == 2 and "a" not in mgr.host and mgr.slot_of("a") is None
    for layer in model.layers:
        for group in layer.groups.values():
            assert not group.lora_a[slot].any() and not group.lora_b[slot].any()
    base = model(TOKENS, POS, model.lora_batch([NO_ADAPTER]))[0]
    torch.testing.assert_close(_logits(model, slot), base)  # an empty slot is a no-op


def test_pinned_slots_are_never_evicted(real):
    model, fetch, fetched = real
    mgr = SlotManager(model, host_cache_bytes=10**9)
    mgr.acquire("a", fetch)
    mgr.acquire("b", fetch)
    with pytest.raises(CapacityError, match="all 2 adapter slots"):
        mgr.acquire("c", fetch)
    assert sorted(mgr.resident()) == ["a", "b"] and mgr.pins("a") == 1 and mgr.pins("b") == 1
    mgr.release("b")
    mgr.acquire("c", fetch)
    assert sorted(mgr.resident()) == ["a", "c"]


class RecordingBuffers:
    """Real bookkeeping target for property tests: records what each slot holds."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.content: list[str | None] = [None] * num_slots

    def write_slot(self, slot: int, weights: LoraWeights) -> None:
        self.content[slot] = weights.adapter_id

    def clear_slot(self, slot: int) -> None:
        self.content[slot] = None


ops = st.lists(st.tuples(st.sampled_from(["acquire", "release", "unload"]), st.integers(0, 7)), max_size=60)


@settings(max_examples=200, deadline=None)
@given(num_slots=st.integers(1, 4), sequence=ops)
def test_slot_bookkeeping_invariants(num_slots, sequence):
    buffers = RecordingBuffers(num_slots)
    mgr = SlotManager(buffers, host_cache_bytes=3 * 10)
    pins: dict[str, int] = {}
    order: list[str] = []  # resident adapters, least recently acquired first
    for op, k in sequence:
        name = f"ad{k}"
        if op == "acquire":
            before = dict(zip(mgr.resident(), [mgr.slot_of(r) for r in mgr.resident()]))
            full = name not in before and mgr.free_slots == 0
            unpinned = [r for r in order if pins.get(r, 0) == 0]
            try:
                mgr.acquire(name, lambda i: _fake_weights(i, 10))
            except CapacityError:
                assert full and not unpinned
                continue
            if full:  # the victim is the least recently used unpinned adapter
                victim = unpinned[0]
                assert mgr.slot_of(victim) is None and victim in mgr.host
                order.remove(victim)
            pins[name] = pins.get(name, 0) + 1
            if name in order:
                order.remove(name)
            order.append(name)
        elif op == "release":
            if pins.get(name, 0):
                mgr.release(name)
                pins[name] -= 1
            else:
                with pytest.raises(OpenLoraError):
                    mgr.release(name)
        else:
            if pins.get(name, 0):
                with pytest.raises(OpenLoraError):
                    mgr.unload(name)
            else:
                mgr.unload(name)
                if name in order:
                    order.remove(name)
                assert name not in mgr.host
        # invariants after every step
        assert sorted(mgr.resident()) == sorted(order)
        for r in mgr.resident():
            assert buffers.content[mgr.slot_of(r)] == r and mgr.pins(r) == pins.get(r, 0)
        assert buffers.content.count(None) == mgr.free_slots
        assert mgr.host.nbytes <= mgr.host.budget_bytes
        assert not set(mgr.host.ids()) & set(mgr.resident())


@torch.inference_mode()
def test_write_slot_replaces_a_larger_adapter_completely(real):
    """Writing rank-2 o/up over a rank-8 all-linear adapter leaves nothing of the old one."""
    model, fetch, _ = real
    big, small = fetch("a"), fetch("c")
    model.write_slot(0, small)
    want = _logits(model, 0)
    model.write_slot(1, big)
    model.write_slot(1, small)
    torch.testing.assert_close(_logits(model, 1), want, rtol=0, atol=0)
    for layer in model.layers:
        for group in layer.groups.values():
            assert torch.equal(group.lora_a[1], group.lora_a[0]) and torch.equal(group.lora_b[1], group.lora_b[0])


def test_tiers_key_by_content_so_one_name_can_hold_two_contents():
    """An id whose content changed is a miss (new key); the old content is never handed out for it."""
    buffers = RecordingBuffers(2)
    mgr = SlotManager(buffers, host_cache_bytes=100)
    old = LoraWeights("bot@v1", 1, {}, digest="d-old")
    new = LoraWeights("bot@v1", 1, {}, digest="d-new")
    assert mgr.acquire("d-old", lambda k: old) == 0
    with pytest.raises(OpenLoraError, match="asked for the adapter of digest d-new"):
        mgr.acquire("d-new", lambda k: old)  # a fetch that hands back other content is refused
    assert mgr.acquire("d-new", lambda k: new) == 1
    assert mgr.resident() == ["bot@v1", "bot@v1"] and mgr.keys_of("bot@v1") == ["d-old", "d-new"]
    mgr.release("d-old")
    mgr.acquire("x", lambda k: LoraWeights("x", 1, {}, digest="x"))  # evicts d-old to the host tier
    assert "d-old" in mgr.host and mgr.slot_of("d-new") == 1 and mgr.host.ids() == ["bot@v1"]


def test_choose_slot_by_requests_takes_the_least_requested_unpinned_then_the_lru():
    slots = [SlotState("a", 0, 1, requests=4.0), SlotState("b", 0, 9, requests=1.0), SlotState("c", 1, 2, requests=0.0)]
    assert choose_slot(slots) == 1  # c is pinned; b was asked for less than a, though used later
    assert choose_slot([SlotState("a", 0, 5, 2.0), SlotState("b", 0, 3, 2.0)]) == 1  # equals: LRU


def test_eviction_by_request_counts_keeps_the_adapter_asked_for_more():
    """Two slots: 'hot' asked for three times, then one-offs. LRU would evict 'hot' at the second
    one-off; by counts the one-offs replace one another. Counts decay: after many half-lives
    without a request 'hot' counts less than a fresh one-off and goes."""
    now = [0.0]
    mgr = SlotManager(RecordingBuffers(2), host_cache_bytes=0, eviction_half_life_s=10.0, clock=lambda: now[0])

    def request(name: str) -> None:
        mgr.acquire(name, lambda i: _fake_weights(i, 10))
        mgr.count_request(name)
        mgr.release(name)
        now[0] += 1.0

    for name in ["hot", "hot", "hot", "one1", "one2", "one3"]:
        request(name)
    assert sorted(mgr.resident()) == ["hot", "one3"]
    now[0] += 100.0  # ten half-lives: hot's 3 requests count less than one fresh request
    request("one4")
    request("one5")
    assert sorted(mgr.resident()) == ["one4", "one5"]


def test_request_counts_rebase_keeps_the_order_and_forgets_the_long_cold():
    now = [0.0]
    counts = RequestCounts(half_life_s=1.0, clock=lambda: now[0])
    counts.record("old")
    now[0] = 15.0
    counts.record("a")
    counts.record("a")
    counts.record("b")
    now[0] = 22.0  # the scale passed 2**20: this record rebases
    counts.record("c")
    assert counts.scaled("a") > counts.scaled("b") > 0 and counts.scaled("c") == 1.0
    assert counts.scaled("old") == 0.0 and len(counts) == 3


def test_lru_manager_ignores_request_counts():
    mgr = SlotManager(RecordingBuffers(1), host_cache_bytes=0)
    mgr.count_request("anything")  # no counts kept: eviction stays LRU
    assert mgr.requests is None and mgr.states()[0].requests == 0.0
