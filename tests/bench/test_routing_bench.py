"""``bench routing``: its analysis on synthetic logs, and the whole benchmark end to end, tiny."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from openlora_ray.bench.routing_bench import (
    RequestRecord,
    RoutingBenchConfig,
    Snapshot,
    _MultiplexedAdapter,
    busiest_share,
    evaluate_targets,
    holder_share,
    load_counts,
    make_workload,
    reference_loads,
    request_metrics,
    run,
)


def rec(index: int, adapter: str, sent: float, replica: str | None, first: float | None = None, status: int = 200, error: str | None = None) -> RequestRecord:
    return RequestRecord(index, adapter, sent, sent + 0.5, status, first, replica, 4 if error is None else 0, error)


def test_holder_share_uses_the_last_snapshot_taken_before_each_request():
    snapshots = [
        Snapshot(at=1.0, resident={"r1": frozenset({"a"}), "r2": frozenset({"b"})}, age_s=0.1),
        Snapshot(at=2.0, resident={"r1": frozenset({"a", "c"}), "r2": frozenset()}, age_s=0.1),
    ]
    records = [
        rec(0, "a", 0.5, "r2"),  # before any snapshot: not counted
        rec(1, "a", 1.5, "r1"),  # resident on r1, served by r1
        rec(2, "b", 1.6, "r1"),  # resident on r2, served by r1: a miss
        rec(3, "c", 1.7, "r2"),  # not resident anywhere yet: not counted
        rec(4, "c", 2.5, "r1"),  # resident on r1 by the second snapshot
        rec(5, "a", 2.6, None, status=503, error="HTTP 503"),  # never served
    ]
    got = holder_share(records, snapshots)
    assert (got["requests_for_resident"], got["on_holder"]) == (3, 2)
    assert got["share"] == pytest.approx(2 / 3)
    assert got["snapshot_age_mean_s"] == pytest.approx((0.6 + 0.7 + 0.6) / 3)
    assert holder_share(records, [])["share"] is None


def test_busiest_share_averages_the_busiest_replicas_part_of_the_work():
    snaps = [
        Snapshot(1.0, {}, 0.1, {"r1": 3, "r2": 1}),
        Snapshot(2.0, {}, 0.1, {"r1": 0, "r2": 0}),  # idle: not counted
        Snapshot(3.0, {}, 0.1, {"r1": 2, "r2": 2}),
    ]
    assert busiest_share(snaps) == pytest.approx((0.75 + 0.5) / 2)
    assert busiest_share([]) is None


def test_load_counts_and_request_metrics():
    described = [
        {"loads_by_tier": {"slot": 6, "host": 1, "fetch": 3}, "evictions": 2},
        {"loads_by_tier": {"slot": 2, "host": 0, "fetch": 4}, "evictions": 1, "multiplex_evictions_refused": 1},
    ]
    loads = load_counts(described)
    assert loads == {"slot_hits": 8, "host_loads": 1, "fetch_loads": 7, "slot_loads": 8, "slot_hit_rate": 0.5, "evictions": 3, "multiplex_evictions_refused": 1}
    records = [rec(0, "a", 0.0, "r1", first=0.1), rec(1, "a", 0.5, "r2", first=0.8), rec(2, "b", 1.0, None, status=0, error="ReadTimeout")]
    m = request_metrics(records)
    assert (m["ok"], m["errors"], m["error_kinds"]) == (2, 1, {"ReadTimeout": 1})
    assert m["duration_s"] == pytest.approx(1.5) and m["requests_per_s"] == pytest.approx(2 / 1.5)
    assert m["tokens_per_s"] == pytest.approx(8 / 1.5) and m["ttft_p50_s"] == pytest.approx(0.2)
    assert m["requests_per_replica"] == [1, 1]


def test_targets_compare_the_affinity_router_with_the_default_one():
    def result(share: float | None, slot_loads: int, fetch_loads: int, p99: float) -> dict:
        return {"holder": {"share": share}, "loads": {"slot_loads": slot_loads, "fetch_loads": fetch_loads}, "ttft_p99_s": p99}

    bound = {"slot_loads": 10, "fetch_loads": 9}
    targets = evaluate_targets({"affinity": result(0.97, 20, 10, 0.4), "p2c": result(0.3, 100, 30, 0.5)}, bound)
    assert targets["holder_share"]["met"] and targets["slot_loads_vs_default"]["value"] == 0.2
    assert targets["slot_loads_vs_default"]["met"] and not targets["fetch_loads_vs_default"]["met"]
    # 9 distinct adapters must each be fetched once: no router gets below 9 / 30 of the default.
    assert targets["fetch_loads_vs_default"]["best_possible"] == pytest.approx(0.3)
    assert targets["slot_loads_vs_default"]["best_possible"] == pytest.approx(0.1)
    assert targets["ttft_p99_vs_default"]["met"]
    assert set(evaluate_targets({"p2c": result(0.3, 1, 1, 1.0)}, bound)) == set()


def test_lower_bound_of_loads_is_below_every_replay_and_counts_each_adapter_once():
    work = make_workload(RoutingBenchConfig(adapters=60, requests=800, seed=5))
    refs = reference_loads(work, replicas=4, slots=4, seed=5)
    distinct = len({w.adapter for w in work})
    assert refs["lower_bound"]["fetch_loads"] == distinct
    for name in ("random", "partitioned"):
        assert refs["lower_bound"]["slot_loads"] <= refs[name]["slot_loads"]
        assert refs["lower_bound"]["fetch_loads"] <= refs[name]["fetch_loads"]
    # One cache of 16 slots still misses at least once per distinct adapter.
    assert distinct <= refs["lower_bound"]["slot_loads"] < len(work)


def test_workload_is_seeded_and_zipf_skewed():
    cfg = RoutingBenchConfig(adapters=50, requests=2000, zipf=1.1, seed=3)
    work = make_workload(cfg)
    assert work == make_workload(cfg) and work != make_workload(RoutingBenchConfig(adapters=50, requests=2000, seed=4))
    counts = Counter(w.adapter for w in work)
    assert counts.most_common(1)[0][0] == "a000" and counts["a000"] > 4 * counts["a009"]
    assert all(cfg.min_prompt_words <= len(w.prompt.split()) <= cfg.max_prompt_words for w in work)


def test_multiplexed_adapter_evicts_once_although_del_runs_twice():
    evicted = []

    class Replica:
        def _evict_for_multiplex(self, adapter_id: str) -> None:
            evicted.append(adapter_id)

    entry = _MultiplexedAdapter(Replica(), "a001@v1")
    entry.__del__()  # Serve's eviction
    del entry  # garbage collection
    assert evicted == ["a001@v1"]


@pytest.mark.timeout(180)
def test_bench_routing_end_to_end_tiny(tmp_path):
    """The benchmark on a real local cluster (2 replicas, 2 slots, 6 adapters, 20 requests, after
    the throwaway settling deployment), with the multiplexing configuration: it runs the most code of the three (the replica subclass, its
    Serve-driven evictions, the builder), and one configuration keeps the test under a minute;
    the others differ from it only in the router class and the replica class. It takes 45-55 s
    on the shared 2-core machine (load average ~10), most of it starting Ray and the replicas;
    the timeout only guards against a hang (a busier machine has taken over two minutes)."""
    cfg = RoutingBenchConfig(
        model_size="tiny", replicas=2, slots=2, adapters=6, rank=4, requests=20, concurrency=4,
        max_tokens=4, warmup_requests=6, settle_requests=4, variant_time_limit_s=30, deploy_timeout_s=60,
        variants=("multiplex",),
    )
    out = tmp_path / "routing.json"
    run(cfg, out)
    report = json.loads(out.read_text())
    assert set(report["variants"]) == {"multiplex"} and report["targets"] == {}
    assert report["settle"]["requests"] == 4 and report["settle"]["errors"] == 0
    m = report["variants"]["multiplex"]
    assert m["replica_class"] == "OwnNodeMultiplexReplica" and m["router_class"].endswith("PowerOfTwoChoicesRequestRouter")
    assert m["ok"] == m["requests"] == 20 and m["errors"] == 0, m["error_kinds"]
    assert m["completion_tokens"] == 20 * 4 and m["tokens_per_s"] > 0 and m["requests_per_s"] > 0
    assert 0 < m["ttft_p50_s"] <= m["ttft_p99_s"] < 30
    assert sum(m["requests_per_replica"]) == 20 and len(m["requests_per_replica"]) <= 2
    assert m["warmup"] == {"requests": 6, "errors": 0}
    loads = m["loads"]
    # Every request acquires its adapter once (the warm-up's base-model requests acquire none): a hit, or a load from the host tier or from disk.
    assert loads["slot_hits"] + loads["slot_loads"] == 20, loads
    # Each replica has a node cache of its own: every requested adapter was downloaded at least
    # once, at most once per replica, and each download was read by a fetch.
    assert report["distinct_adapters_requested"] <= loads["store_downloads"] <= 2 * 6, loads
    assert loads["fetch_loads"] >= loads["store_downloads"], loads
    holder = m["holder"]
    assert holder["snapshots"] > 0 and 0 <= holder["on_holder"] <= holder["requests_for_resident"] <= 20
    assert set(report["reference_loads"]) == {"random", "partitioned", "lower_bound"}
