"""The routing policy as pure functions: behaviours 1-5 of issue 5's "Router" section, properties,
and the at-scale simulator's fast path against the policy itself."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from hypothesis import given, settings as hsettings, strategies as st
from pydantic import ValidationError

from openlora_ray.serve.ring import ReplicaRing, probe_sequence, successor_by_scan
from openlora_ray.serve.router_memory import InFlight, Popularity, RecentSends
from openlora_ray.serve.routing import (
    FAR_HOLDERS,
    RouterSettings,
    RoutingInputs,
    Tier,
    capacity_bucket,
    holder_tier,
    is_busy,
    kv_exhausted,
    placement_key,
    rank_replicas,
    replica_load,
    victim_heat,
    waits_for_slot,
)
from openlora_ray.serve.routing_index import RoutingIndex
from openlora_ray.serve.state import ReplicaState

SETTINGS = RouterSettings()


def rs(
    replica_id: str,
    *,
    resident: tuple[str, ...] = (),
    host: tuple[str, ...] = (),
    disk: tuple[str, ...] = (),
    loading: tuple[str, ...] = (),
    running: int = 0,
    queued: int = 0,
    max_running: int = 8,
    free_vram_mb: int = 8192,
) -> ReplicaState:
    return ReplicaState(
        replica_id,
        resident=frozenset(resident),
        host=frozenset(host),
        disk=frozenset(disk),
        loading=frozenset(loading),
        num_slots=8,
        free_slots=8 - len(resident),
        free_vram_mb=free_vram_mb,
        queued=queued,
        running=running,
        max_running=max_running,
    )


def flat(ranks: list[list[str]]) -> list[str]:
    return [r for rank in ranks for r in rank]


def as_sets(ranks: list[list[str]]) -> list[frozenset[str]]:
    return [frozenset(rank) for rank in ranks]


def route(adapter: str | None, states: list[ReplicaState], recent=(), s: RouterSettings = SETTINGS) -> str:
    """Where Serve sends the request when no replica is full: the first rank's least loaded member."""
    by_id = {x.replica_id: x for x in states}
    first = rank_replicas(adapter, states, s, RoutingInputs(recent=recent))[0]
    return min(first, key=lambda r: (by_id[r].load, r))


# --- 1. holders first ---------------------------------------------------------------------------


def test_resident_holders_win_as_one_rank_so_serve_picks_the_least_loaded() -> None:
    states = [rs("a"), rs("b", resident=("x",), running=3), rs("c", resident=("x",), running=1), rs("d", host=("x",))]
    ranks = rank_replicas("x", states, SETTINGS)
    assert set(ranks[0]) == {"b", "c"}
    assert ranks[1] == ["d"]
    assert route("x", states) == "c"


def test_tiers_resident_then_loading_then_host_then_disk_then_the_rest() -> None:
    states = [rs("none"), rs("disk", disk=("x",)), rs("host", host=("x",)), rs("load", loading=("x",)), rs("slot", resident=("x",))]
    ranks = rank_replicas("x", states, SETTINGS)
    assert ranks[:5] == [["slot"], ["load"], ["host"], ["disk"], ["none"]]
    assert [holder_tier("x", s) for s in states] == [Tier.NONE, Tier.DISK, Tier.HOST, Tier.LOADING, Tier.RESIDENT]


def test_a_replica_this_router_just_sent_the_adapter_to_counts_as_loading_it() -> None:
    states = [rs("a", host=("x",)), rs("b")]
    assert rank_replicas("x", states, SETTINGS, RoutingInputs(recent={"b"}))[0] == ["b"]
    assert rank_replicas("x", states, SETTINGS)[0] == ["a"]


# --- 2. cold adapters: most free VRAM, then shorter queue, then the adapter's hash ------------------


def test_cold_adapter_goes_to_the_most_free_vram() -> None:
    states = [rs("a", free_vram_mb=2048), rs("b", free_vram_mb=9216, running=2), rs("c", free_vram_mb=4096)]
    ranks = rank_replicas("cold", states, SETTINGS)
    assert ranks == [["b"], ["c"], ["a"]]


def test_equal_vram_bucket_ties_go_to_the_shorter_queue() -> None:
    states = [rs("a", running=6), rs("b", running=1), rs("c", running=4)]
    assert flat(rank_replicas("cold", states, SETTINGS)) == ["b", "c", "a"]


def test_vram_is_bucketed_so_tiny_differences_do_not_decide() -> None:
    """Replicas 64 MB apart tie; the adapter's probe order decides, the same way for any input order."""
    states = [rs(f"r{i}", free_vram_mb=8192 + 64 * (i % 3)) for i in range(8)]
    ring = ReplicaRing([x.replica_id for x in states])
    winners = Counter()
    for k in range(200):
        a = f"adapter-{k}"
        expected = next(probe_sequence(a, SETTINGS.probe_points, ring.successor))
        shuffled = random.Random(a).sample(states, len(states))
        assert rank_replicas(a, shuffled, SETTINGS)[0] == [expected]
        winners[expected] += 1
    assert len(winners) == 8 and max(winners.values()) < 50  # spread, not piled on the "emptiest"


def test_cold_adapters_spread_over_equal_replicas() -> None:
    """The first probe is a consistent-hash ring successor: every replica gets a share, within the
    ring's spread (32 points per replica)."""
    states = [rs(f"replica-{i}") for i in range(10)]
    counts = Counter(rank_replicas(f"a{k}", states, SETTINGS)[0][0] for k in range(5000))
    assert len(counts) == 10
    assert min(counts.values()) > 250 and max(counts.values()) < 750  # 500 each in expectation


def test_a_cold_adapter_goes_where_the_slot_it_evicts_is_coldest() -> None:
    """Full replicas: the one whose coldest slot holds an adapter nobody asked for lately wins,
    whatever the probe order; a replica with a free slot (nothing evicted) beats both."""
    pop = Popularity(half_life_s=60.0)
    for _ in range(8):
        for a in ("h1", "h2", "w1"):
            pop.record(a, 0.0)
    full = {"num_slots": 2, "free_slots": 0, "free_vram_mb": 8192, "max_running": 8}
    hot = ReplicaState("hot", resident=frozenset({"h1", "h2"}), **full)
    stale = ReplicaState("stale", resident=frozenset({"w1", "gone"}), **full)
    inputs = RoutingInputs(popularity=pop, now=1.0)
    assert victim_heat(hot, pop, 1.0, ()) > victim_heat(stale, pop, 1.0, ()) == 0
    assert rank_replicas("new", [hot, stale], SETTINGS, inputs) == [["stale"], ["hot"]]
    roomy = ReplicaState("roomy", resident=frozenset({"h1"}), num_slots=2, free_slots=1, free_vram_mb=8192, max_running=8)
    assert rank_replicas("new", [hot, stale, roomy], SETTINGS, inputs)[0] == ["roomy"]
    # A slot pinned by a request in flight cannot be evicted: the next coldest counts.
    assert victim_heat(stale, pop, 1.0, {"gone"}) == victim_heat(hot, pop, 1.0, ())


def test_free_kv_blocks_decide_over_free_memory_when_reported() -> None:
    kv = {"num_slots": 4, "free_slots": 4, "max_running": 8}
    low = ReplicaState("low", free_vram_mb=30000, free_kv_blocks=100, total_kv_blocks=1000, **kv)
    high = ReplicaState("high", free_vram_mb=1000, free_kv_blocks=900, total_kv_blocks=1000, **kv)
    assert capacity_bucket(high, SETTINGS) > capacity_bucket(low, SETTINGS)
    assert rank_replicas("cold", [low, high], SETTINGS)[0] == ["high"]
    # Without KV figures the fallback is free device memory.
    old = [ReplicaState("a", free_vram_mb=30000, **kv), ReplicaState("b", free_vram_mb=1000, **kv)]
    assert rank_replicas("cold", old, SETTINGS)[0] == ["a"]
    # Out of KV blocks is busy: even a holder of the adapter goes after an idle replica.
    full = ReplicaState("full", resident=frozenset({"x"}), free_kv_blocks=5, total_kv_blocks=1000, **kv)
    assert kv_exhausted(full, SETTINGS) and not kv_exhausted(high, SETTINGS)
    assert rank_replicas("x", [full, high], SETTINGS) == [["high"], ["full"]]
    assert ReplicaState.from_stats("high", high.to_stats()).free_kv_fraction == 0.9
    # At the same occupancy a larger cache (a bigger GPU) has more room; a few blocks apart do not reorder.
    small = ReplicaState("small", free_kv_blocks=40, total_kv_blocks=40, **kv)
    large = ReplicaState("large", free_kv_blocks=120, total_kv_blocks=120, **kv)
    assert rank_replicas("cold", [small, large], SETTINGS)[0] == ["large"]
    near = ReplicaState("near", free_kv_blocks=896, total_kv_blocks=1000, **kv)
    assert capacity_bucket(near, SETTINGS) == capacity_bucket(high, SETTINGS)


def test_popularity_halves_per_half_life_and_forgets_cold_adapters() -> None:
    pop = Popularity(half_life_s=10.0)
    for _ in range(4):
        pop.record("x", 0.0)
    pop.record("y", 0.0)
    assert pop.count("x", 10.0) == pytest.approx(2.0) and pop.heat("x", 0.0) == 5 and pop.heat("never", 0.0) == 0
    assert pop.coldest(["x", "y"], 0.0) == pop.heat("y", 0.0) == 3  # counts 16 and 4 units of 0.25
    pop.record("z", 60.0)  # a prune: y decayed to 1/64, below FORGET
    assert len(pop) == 2 and pop.count("x", 60.0) == pytest.approx(4 / 64)
    assert pop.count("z", 70.0) == pytest.approx(0.5)


# --- 3. hot adapters spill past the threshold, and the holder set shrinks as slots are reclaimed ---


def test_spill_when_every_holder_is_past_the_threshold() -> None:
    s = RouterSettings(spill_load=0.75)
    states = [rs("hot", resident=("x",), running=6), rs("b", running=1), rs("c", running=2)]  # 6/8 = 0.75
    ranks = rank_replicas("x", states, s)
    assert ranks[0] == ["b"]  # the best non-holder: lower load bucket
    assert ranks[-1] == ["hot"]  # still a candidate, after every non-holder below the threshold
    below = [rs("hot", resident=("x",), running=5), rs("b", running=1)]
    assert rank_replicas("x", below, s)[0] == ["hot"]


def test_the_routers_own_queue_lengths_decide_the_spill_over_stale_stats() -> None:
    s = RouterSettings(spill_load=1.0)
    stale_idle = [rs("hot", resident=("x",), running=1), rs("b")]
    assert rank_replicas("x", stale_idle, s, RoutingInputs(queue_lens={"hot": 8}))[0] == ["b"]  # 8 / 8 = busy
    stale_busy = [rs("hot", resident=("x",), running=8, queued=4), rs("b")]
    assert rank_replicas("x", stale_busy, s)[0] == ["b"]
    assert rank_replicas("x", stale_busy, s, RoutingInputs(queue_lens={"hot": 3}))[0] == ["hot"]  # drained since


def test_busy_holders_come_last_after_every_other_replica() -> None:
    """With every replica busy, the catch-all rank (Serve takes its shortest queue) comes before
    the busy holders: a replica below them there means a load instead of a wait behind a full batch."""
    s = RouterSettings(spill_load=0.75)
    states = [rs("b", running=8), rs("hot", resident=("x",), running=7), rs("c", running=7)]
    assert rank_replicas("x", states, s) == [["b", "c"], ["hot"]]


def test_holders_grow_with_load_and_shrink_when_a_replica_stops_reporting() -> None:
    s = RouterSettings(spill_load=0.75)
    a = rs("a", resident=("x",), running=7)
    b, c = rs("b", running=1), rs("c", running=2)
    # Every holder busy: spill to b, which loads x.
    assert route("x", [a, b, c], s=s) == "b"
    b = rs("b", resident=("x",), running=2)
    # Both hold x; load drops on a: both are holders below the threshold, sharing the first rank
    # (hysteresis: the spill copy keeps serving x for as long as it holds it).
    a = rs("a", resident=("x",), running=2)
    assert set(rank_replicas("x", [a, b, c], s)[0]) == {"a", "b"}
    # b evicts x (LRU, on its own) and stops reporting it: it is a plain non-holder again.
    b = rs("b", running=0)
    ranks = rank_replicas("x", [a, b, c], s)
    assert ranks[0] == ["a"]
    assert "b" not in ranks[0]


def test_spill_target_keeps_the_hot_adapter_while_the_view_is_stale() -> None:
    """After a spill, the next request goes to the same spill target, not to a third replica."""
    s = RouterSettings(spill_load=0.75)
    view = [rs("a", resident=("x",), running=7), rs("b"), rs("c"), rs("d")]
    recent = RecentSends(ttl_s=4.0)
    first = route("x", view, s=s)
    recent.record("x", first, now=0.0)
    assert route("x", view, recent.replicas_for("x", now=1.0), s=s) == first


# --- 4. concurrent cold requests converge ------------------------------------------------------------


def test_two_independent_routers_with_the_same_stale_view_send_a_cold_adapter_to_one_replica() -> None:
    view = [rs(f"r{i}", free_vram_mb=8192 + 64 * i, running=i % 2) for i in range(16)]
    routers = [RecentSends(4.0), RecentSends(4.0)]
    for k in range(50):
        adapter = f"cold-{k}"
        picks = set()
        for t, router in enumerate(routers * 3):  # interleaved requests through both routers
            chosen = route(adapter, random.Random(t).sample(view, len(view)), router.replicas_for(adapter, t * 0.1))
            router.record(adapter, chosen, t * 0.1)
            picks.add(chosen)
        assert len(picks) == 1, (adapter, picks)


def test_routers_whose_queue_lengths_differ_within_a_load_bucket_still_agree() -> None:
    view = [rs(f"r{i}") for i in range(12)]
    for k in range(50):
        a = f"cold-{k}"
        top = rank_replicas(a, view, SETTINGS)[0]
        # Another router has sent one request to every replica: same bucket (0.25 x 8 = 2 requests).
        assert rank_replicas(a, view, SETTINGS, RoutingInputs(queue_lens={s.replica_id: 1 for s in view}))[0] == top


def test_recently_sent_keeps_the_next_request_on_the_loading_replica_when_the_view_shifts() -> None:
    recent = RecentSends(ttl_s=4.0)
    view = [rs(f"r{i}") for i in range(4)]
    first = route("x", view)
    recent.record("x", first, now=10.0)
    # Another replica's stats now show more free VRAM; the loading one does not report x yet.
    shifted = [rs(s.replica_id, free_vram_mb=20480) if s.replica_id != first else s for s in view]
    assert route("x", shifted) != first
    assert route("x", shifted, recent.replicas_for("x", now=11.0)) == first
    assert recent.replicas_for("x", now=14.5) == frozenset()  # expired after the TTL


def test_recent_sends_expire_prune_and_forget_dead_replicas() -> None:
    recent = RecentSends(ttl_s=2.0)
    recent.record("x", "a", 0.0)
    recent.record("y", "b", 0.5)
    assert recent.replicas_for("x", 1.0) == {"a"} and len(recent) == 2
    recent.record("z", "c", 2.2)  # a TTL after the last prune: expired entries go
    assert len(recent) == 2 and recent.replicas_for("x", 2.2) == frozenset()
    recent.forget_replicas({"c"})
    assert len(recent) == 1 and recent.replicas_for("z", 2.3) == {"c"}


def test_recent_sends_discard_withdraws_only_the_entry_it_names() -> None:
    recent = RecentSends(ttl_s=4.0)
    recent.record("x", "a", 1.0)
    recent.record("x", "b", 1.0)
    recent.discard("x", "a", 1.0)
    assert recent.replicas_for("x", 2.0) == {"b"}
    recent.record("x", "b", 1.5)  # refreshed by a later send: a discard of the 1.0 entry keeps it
    recent.discard("x", "b", 1.0)
    assert recent.replicas_for("x", 2.0) == {"b"}
    recent.discard("x", "b", 1.5)
    assert len(recent) == 0



# --- 5. base model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", [None, ""])
def test_base_model_requests_get_one_rank_with_every_replica(adapter: str | None) -> None:
    states = [rs("a", resident=("x",), running=7), rs("b"), rs("c", running=3)]
    assert rank_replicas(adapter, states, SETTINGS) == [["a", "b", "c"]]
    assert rank_replicas(adapter, [], SETTINGS) == []


def test_replicas_that_never_reported_rank_last_among_the_idle() -> None:
    states = [ReplicaState.from_stats("new", {}), rs("b")]
    assert rank_replicas("x", states, SETTINGS) == [["b"], ["new"]]


def test_only_strict_ranks_non_holders_get_a_rank_of_their_own() -> None:
    states = [rs(f"r{i}") for i in range(20)]
    ranks = rank_replicas("x", states, RouterSettings(strict_ranks=3))
    assert [len(r) for r in ranks] == [1, 1, 1, 17]


# --- settings ----------------------------------------------------------------------------------------


def test_settings_round_trip_through_json_and_reject_unknown_keys() -> None:
    s = RouterSettings(spill_load=0.75, vram_bucket_mb=256, recent_ttl_s=2.5)
    assert RouterSettings(**json.loads(json.dumps(s.model_dump()))) == s
    with pytest.raises(ValidationError):
        RouterSettings(spill_loda=0.5)
    with pytest.raises(ValidationError):
        RouterSettings(spill_load=0)


# --- slots held by requests in flight ---------------------------------------------------------------


def test_a_holder_whose_slots_are_all_in_use_by_other_adapters_ranks_after_an_idle_replica() -> None:
    """x sits in a's host tier, but a's 8 slots are pinned by 8 other adapters' running requests:
    a request for x would wait there for a whole generation, so the idle non-holder b goes first."""
    others = {f"o{i}" for i in range(8)}
    states = [rs("a", host=("x",), resident=tuple(sorted(others)), running=8, max_running=16), rs("b")]
    assert rank_replicas("x", states, SETTINGS, RoutingInputs(in_flight={"a": others})) == [["b"], ["a"]]
    # One of them finishes: a slot is free to evict, and the host-tier holder wins again.
    assert rank_replicas("x", states, SETTINGS, RoutingInputs(in_flight={"a": set(sorted(others)[:7])}))[0] == ["a"]
    # Without the in-flight view (the simulator, a router that has sent nothing yet) nothing changes.
    assert rank_replicas("x", states, SETTINGS)[0] == ["a"]


def test_slots_in_use_by_other_adapters_decide_over_stale_residency() -> None:
    pinned = {f"o{i}" for i in range(7)}
    resident = rs("a", resident=("x", *sorted(pinned)))
    assert not waits_for_slot("x", resident, pinned)  # 7 of 8 slots in use: x keeps its own
    # x is in use there (a request in flight shares its slot) while every other slot is pinned.
    assert not waits_for_slot("x", rs("a", loading=("x",)), pinned | {"x"})
    assert rank_replicas("x", [resident, rs("b")], SETTINGS, RoutingInputs(in_flight={"a": pinned | {"x"}}))[0] == ["a"]
    assert waits_for_slot("y", resident, pinned | {"x"})
    assert not waits_for_slot("y", ReplicaState("new"), pinned | {"x"})  # slot count not reported yet
    # Eight other adapters in flight: x cannot still be in a slot, whatever the older stats say.
    eight = pinned | {"o7"}
    assert waits_for_slot("x", resident, eight)
    assert rank_replicas("x", [resident, rs("b")], SETTINGS, RoutingInputs(in_flight={"a": eight})) == [["b"], ["a"]]


def test_in_flight_counts_requests_per_adapter_and_forgets_dead_replicas() -> None:
    f = InFlight()
    f.add("r1", "a", "x")
    f.add("r2", "a", "x")
    f.add("r3", "a", "y")
    f.add("r4", "b", "x")
    assert {k: set(v) for k, v in f.adapters().items()} == {"a": {"x", "y"}, "b": {"x"}}
    f.remove("r1")
    assert set(f.adapters()["a"]) == {"x", "y"}  # r2 still uses x
    f.remove("r2")
    f.remove("r2")  # completed twice: ignored
    assert set(f.adapters()["a"]) == {"y"}
    f.add("r3", "b", "y")  # re-sent elsewhere: counted where it went last
    assert "a" not in f.adapters() and set(f.adapters()["b"]) == {"x", "y"}
    f.forget_replicas({"c"})
    assert len(f) == 0 and not f.adapters()


# --- properties --------------------------------------------------------------------------------------

ADAPTERS = ["x", "y", "z"]
adapter_sets = st.frozensets(st.sampled_from(ADAPTERS), max_size=2)


@st.composite
def replica_states(draw: st.DrawFn) -> list[ReplicaState]:
    n = draw(st.integers(1, 12))
    out = []
    for i in range(n):
        out.append(
            ReplicaState(
                f"r{i}",
                resident=draw(adapter_sets),
                host=draw(adapter_sets),
                disk=draw(adapter_sets),
                loading=draw(adapter_sets),
                free_vram_mb=draw(st.integers(0, 4) ) * 512,
                running=draw(st.integers(0, 8)),
                queued=draw(st.integers(0, 4)),
                max_running=8,
                num_slots=draw(st.integers(0, 3)),  # few slots: the in-flight sets below fill them
            )
        )
    return out


@st.composite
def routing_inputs(draw: st.DrawFn) -> RoutingInputs:
    ids = st.sampled_from([f"r{i}" for i in range(12)])
    popularity = Popularity(half_life_s=10.0)
    for adapter, t in draw(st.lists(st.tuples(st.sampled_from(ADAPTERS + ["o1", "o2"]), st.floats(0, 30)), max_size=20)):
        popularity.record(adapter, t)
    return RoutingInputs(
        recent=draw(st.frozensets(ids, max_size=3)),
        queue_lens=draw(st.dictionaries(ids, st.integers(0, 16), max_size=6)),
        in_flight=draw(st.dictionaries(ids, st.frozensets(st.sampled_from(ADAPTERS + ["o1", "o2"])), max_size=6)),
        popularity=draw(st.none() | st.just(popularity)),
        now=30.0,
    )


@hsettings(max_examples=200, deadline=None)
@given(
    states=replica_states(),
    adapter=st.sampled_from(ADAPTERS + [None]),
    spill=st.sampled_from([0.5, 0.75, 1.0, 1.5]),
    strict=st.integers(1, 4),
    sample=st.sampled_from([1, 2, 100]),
    seed=st.integers(0, 1000),
    inputs=routing_inputs(),
)
def test_properties(states, adapter, spill, strict, sample, seed, inputs) -> None:
    s = RouterSettings(spill_load=spill, strict_ranks=strict, holder_sample=sample)
    ranks = rank_replicas(adapter, states, s, inputs)
    ids = [x.replica_id for x in states]
    # Always a permutation of the candidates, no empty rank.
    assert sorted(flat(ranks)) == sorted(ids)
    assert all(ranks)
    # Deterministic: input order changes nothing.
    shuffled = random.Random(seed).sample(states, len(states))
    if adapter is None:
        assert ranks == [ids]
        return
    assert rank_replicas(adapter, shuffled, s, inputs) == ranks
    tiers = {x.replica_id: holder_tier(adapter, x, inputs.recent) for x in states}
    load = {x.replica_id: replica_load(x, inputs.queue_lens) for x in states}
    slot_wait = {x.replica_id: waits_for_slot(adapter, x, inputs.in_flight.get(x.replica_id, ())) for x in states}
    busy = {x.replica_id: is_busy(load[x.replica_id], s) or slot_wait[x.replica_id] or kv_exhausted(x, s) for x in states}
    good = [r for r in ids if tiers[r] is not Tier.NONE and not busy[r]]
    position = {r: i for i, rank in enumerate(ranks) for r in rank}
    near = [r for r in ids if tiers[r] <= Tier.LOADING]
    if sample < len(near):
        # A sample of the slot holders: walking them (sorted) from ``draw`` until ``sample`` idle ones
        # are found; those rank first, then those not examined (one rank), then every non-holder.
        near.sort()
        start = inputs.draw % len(near)
        walk = near[start:] + near[:start]
        examined: list[str] = []
        for r in walk:
            if sum(not busy[e] for e in examined) == sample:
                break
            examined.append(r)
        chosen = [r for r in examined if not busy[r]]
        assert len(chosen) == min(sample, sum(not busy[r] for r in near))
        if chosen:
            assert set(ranks[0]) <= set(chosen) | {r for r in good if r not in near}
        unexamined = walk[len(examined) :]
        later = [r for r in ids if tiers[r] is Tier.NONE or busy[r] or r in unexamined]
        assert all(position[c] < position[r] for c in chosen for r in later)
        if unexamined:
            assert sorted(ranks[position[unexamined[0]]]) == sorted(unexamined)
            assert all(position[u] < position[r] for u in unexamined for r in ids if tiers[r] is Tier.NONE)
        return
    if good:
        # A holder below the threshold always ranks first, and the first rank is its best tier.
        best = min(tiers[r] for r in good)
        assert set(ranks[0]) == {r for r in good if tiers[r] == best}
    # Every holder below the threshold precedes every non-holder; busy holders come last.
    for g in good:
        assert all(position[g] < position[r] for r in ids if tiers[r] is Tier.NONE or busy[r])
    busy_holders = {r for r in ids if tiers[r] is not Tier.NONE and busy[r]}
    if busy_holders:
        assert set(ranks[-1]) == busy_holders
    # Then the first ``strict`` idle non-holders of the probe sequence, one per rank, in placement order.
    ring = ReplicaRing(ids)
    wanted = 1 if good else strict  # with a holder to take it, one candidate is the fallback
    candidates = [r for r in probe_sequence(adapter, s.probe_points, ring.successor) if tiers[r] is Tier.NONE and not busy[r]][:wanted]
    after_holders = ranks[len({tiers[r] for r in good}) :][: len(candidates)]
    assert all(len(rank) == 1 for rank in after_holders)
    assert {rank[0] for rank in after_holders} == set(candidates)
    by_id = {x.replica_id: x for x in states}

    def key(r: str) -> tuple[int, ...]:
        pinned = inputs.in_flight.get(r, ())
        return placement_key(by_id[r], load[r], s, victim_heat(by_id[r], inputs.popularity, inputs.now, pinned))

    keys = [key(rank[0]) for rank in after_holders]
    assert keys == sorted(keys, reverse=True)


@st.composite
def state_updates(draw: st.DrawFn) -> list[ReplicaState]:
    """A history of stats reports from up to 12 replicas (later reports replace earlier ones)."""
    pool = draw(replica_states())
    return [draw(st.sampled_from(pool)) for _ in range(draw(st.integers(0, 20)))] + pool


@hsettings(max_examples=300, deadline=None)
@given(
    history=state_updates(),
    members=st.integers(1, 12),
    adapter=st.sampled_from(ADAPTERS + [None]),
    spill=st.sampled_from([0.5, 1.0, 1.5]),
    strict=st.integers(1, 4),
    probes=st.integers(1, 30),
    inputs=routing_inputs(),
)
def test_the_index_ranks_exactly_as_the_reference_scan(history, members, adapter, spill, strict, probes, inputs) -> None:
    """``RoutingIndex.rank`` (holders from the adapter map, probes by bisection on the ring) equals
    ``rank_replicas`` (every replica scanned), after any sequence of reports and membership changes."""
    s = RouterSettings(spill_load=spill, strict_ranks=strict, probe_points=probes)
    index = RoutingIndex()
    index.set_replicas({x.replica_id for x in history} | {"gone"})
    index.update(ReplicaState("gone", resident=frozenset(ADAPTERS), host=frozenset(ADAPTERS)))
    latest: dict[str, ReplicaState] = {}
    for state in history:
        index.update(state)
        latest[state.replica_id] = state
    live = sorted(latest)[:members]
    index.set_replicas(live)
    states = [latest[r] for r in live]
    expected = rank_replicas(adapter, states, s, inputs)
    assert index.rank(adapter, s, inputs) == (expected if adapter else [sorted(live)])
    for a in ADAPTERS:
        assert index.holders(a) == {x.replica_id for x in states if x.holds(a)}


def test_a_hot_adapter_in_every_host_tier_ranks_only_its_probed_host_holders() -> None:
    """Past FAR_HOLDERS host-RAM holders, only those among the adapter's probes are ranked as
    holders (the rest join the catch-all): the index and the reference agree on it."""
    states = [rs(f"r{i:02d}", host=("x",)) for i in range(3 * FAR_HOLDERS)]
    index = RoutingIndex()
    index.set_replicas([x.replica_id for x in states])
    for x in states:
        index.update(x)
    ranks = rank_replicas("x", states, SETTINGS)
    assert index.rank("x", SETTINGS) == ranks
    probed = set(probe_sequence("x", SETTINGS.probe_points, ReplicaRing([x.replica_id for x in states]).successor))
    assert ranks[0] == sorted(probed) and len(ranks) == 2 and len(ranks[1]) == len(states) - len(probed)
    few = states[: FAR_HOLDERS]
    assert rank_replicas("x", few, SETTINGS)[0] == sorted(x.replica_id for x in few)


def test_a_hot_adapter_ranks_a_sample_of_its_idle_holders_first_and_the_rest_next() -> None:
    """With more idle slot holders than ``holder_sample``, a decision ranks that many first (where
    the walk starts differs per decision), the other holders next (one rank), unexamined."""
    states = [rs(f"r{i:02d}", resident=("x",)) for i in range(20)] + [rs(f"s{i}") for i in range(5)]
    s = RouterSettings(holder_sample=4)
    firsts = set()
    for draw in range(20):
        ranks = rank_replicas("x", states, s, RoutingInputs(draw=draw))
        assert len(ranks[0]) == 4 and all(r.startswith("r") for r in ranks[0])
        assert len(ranks[1]) == 16 and all(r.startswith("r") for r in ranks[1])
        assert len(ranks[2]) == 1 and ranks[2][0].startswith("s")  # one candidate: the fallback
        assert len(ranks) == 4 and len(ranks[3]) == 4
        firsts.add(tuple(ranks[0]))
    assert len(firsts) == 20


def test_ring_successor_by_bisection_equals_the_scan() -> None:
    ids = [f"replica-{i}" for i in range(50)]
    ring = ReplicaRing(ids)
    rng = random.Random(0)
    for point in [0, 2**64 - 1] + [rng.getrandbits(64) for _ in range(500)]:
        assert ring.successor(point) == successor_by_scan(point, ids)


# --- the at-scale simulator (openlora_ray.serve.simulate) ------------------------------------------


@pytest.mark.parametrize("spill", [0.75, 2.0])
def test_simulator_index_chooses_exactly_as_the_reference(spill: float) -> None:
    """The simulator's index-driven router and the O(replicas) reference make the same choices."""
    import dataclasses

    from openlora_ray.serve.simulate import AffinityPolicy, SimConfig, make_trace, simulate

    cfg = SimConfig(replicas=30, slots=4, adapters=1500, requests=3000, utilisation=0.95, max_ongoing=10, routers=3, host_slots=8)
    s = RouterSettings(spill_load=spill, strict_ranks=3)
    trace = make_trace(cfg)
    fast, fast_chosen = simulate(cfg, trace, AffinityPolicy.name, s)
    exact, exact_chosen = simulate(dataclasses.replace(cfg, exact=True), trace, AffinityPolicy.name, s)
    assert (fast_chosen == exact_chosen).all()
    assert fast.hit_rate == exact.hit_rate and fast.beyond_holders > 100 and fast.loads > fast.store_loads


def _optimal_hits(trace: list[int], slots: int) -> int:
    """Exhaustive search over every admission/eviction choice (tiny traces only)."""
    best: dict[frozenset[int], int] = {frozenset(): 0}
    for a in trace:
        nxt: dict[frozenset[int], int] = {}
        for cache, hits in best.items():
            options = [(cache, hits + 1)] if a in cache else [(cache, hits)]
            if a not in cache:
                if len(cache) < slots:
                    options.append((cache | {a}, hits))
                options += [((cache - {b}) | {a}, hits) for b in cache]
            for c, h in options:
                nxt[c] = max(nxt.get(c, -1), h)
        best = nxt
    return max(best.values())


@hsettings(max_examples=80, deadline=None)
@given(trace=st.lists(st.integers(0, 4), min_size=1, max_size=12), slots=st.integers(1, 3))
def test_belady_is_optimal_and_bounds_the_static_optimum(trace: list[int], slots: int) -> None:
    import numpy as np

    from openlora_ray.serve.simulate import belady_hits, static_optimum_hits

    arr = np.array(trace, dtype=np.int32)
    assert belady_hits(arr, slots) == _optimal_hits(trace, slots)
    assert static_optimum_hits(arr, slots) <= belady_hits(arr, slots)


def test_routing_sim_cli_prints_a_table_and_writes_json(tmp_path, capsys) -> None:
    import argparse

    from openlora_ray.serve.simulate import register_bench

    parser = argparse.ArgumentParser()
    register_bench(parser.add_subparsers(dest="bench"))
    out = tmp_path / "sim.json"
    args = parser.parse_args(
        ["routing-sim", "--replicas", "20", "--slots", "4", "--adapters", "400", "--requests", "2000", "--out", str(out)]
    )
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "lora-affinity" in table and "serve-default" in table and "belady" in table
    payload = json.loads(out.read_text())
    belady = payload["belady"]["hit_rate"]
    for p in payload["policies"]:
        assert 0 < p["hit_rate"] <= belady
        assert p["loads"] == round((1 - p["hit_rate"]) * 2000)


def test_routing_sim_decision_time_prints_the_cpu_and_the_percentiles(tmp_path, capsys) -> None:
    import argparse

    from openlora_ray.serve.simulate import register_bench

    parser = argparse.ArgumentParser()
    register_bench(parser.add_subparsers(dest="bench"))
    out = tmp_path / "decisions.json"
    args = parser.parse_args(
        ["routing-sim", "--decision-time", "--replicas", "40", "--adapters", "2000", "--decisions", "300",
         "--out", str(out)]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("CPU: ") and "median us" in printed and "p99 us" in printed
    payload = json.loads(out.read_text())
    assert payload["decisions"] == 300 and 0 < payload["median_us"] <= payload["p99_us"]
    assert payload["holders_mean"] > 1  # the stream is skewed toward adapters with several copies


def _tiny_cluster(adapters: list[int], service_s: float = 100.0, **cfg_overrides):
    """A one-replica cluster over a hand-made trace (arrivals 1 s apart)."""
    import numpy as np

    from openlora_ray.serve.simulate import Cluster, SimConfig, Trace

    n = len(adapters)
    cfg = SimConfig(replicas=1, slots=2, adapters=10, requests=n, routers=1, **cfg_overrides)
    trace = Trace(
        adapters=np.array(adapters, dtype=np.int32), arrivals=np.arange(1.0, n + 1.0),
        service=np.full(n, service_s), routers=np.zeros(n, dtype=np.int32),
    )
    return Cluster(cfg, trace)


@pytest.mark.parametrize(("half_life_s", "kept"), [(0.0, {2, 3}), (600.0, {1, 3})])
def test_simulated_replicas_evict_the_lru_slot_or_the_least_requested(half_life_s: float, kept: set[int]) -> None:
    """Adapter 1 asked for twice, then 2, then 3: LRU evicts 1 (used longest ago); eviction by
    request counts evicts 2 (asked for once), keeping the adapter asked for more."""
    cluster = _tiny_cluster([1, 1, 2, 3], eviction_half_life_s=half_life_s, max_running=8, max_ongoing=8)
    for i in range(4):
        cluster.admit(i, 0)
    assert set(cluster.lru[0]) == kept and cluster.loads == 3 and cluster.hits == 1


def test_simulated_serve_probes_a_replica_its_cache_says_is_full() -> None:
    """Serve's pick re-probes replicas its queue-length cache shows full when no other is below
    max_ongoing (``_select_from_candidate_replicas``), so a stale 'full' does not skip a replica
    that has since freed a row."""
    cluster = _tiny_cluster([1, 1], service_s=0.5, max_running=1, max_ongoing=1, queue_cache_s=1e9)
    cluster.admit(0, 0)
    assert cluster.pick([0], 1) == -1  # request 0 still runs: the probe says full
    cluster.advance(2.0)  # it ended at 1.8 (a 0.3 s load, then 0.5 s)
    cluster.cached_q[0, 0] = 1  # the entry as a router that did not send it would still have it
    assert cluster.queue_len(0, 0, 2.0) == 1
    assert cluster.pick([0], 1) == 0 and cluster.queue_len(0, 0, 2.0) == 0
