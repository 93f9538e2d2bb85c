"""``openlora-ray bench routing-sim``: the routing policy at scale, in a discrete-event simulator.

Default scale (issue 5): 1,000 replicas with 16 adapter slots each, 100,000 adapters, a seeded
Zipf(1.0) trace of 1,000,000 requests arriving as a Poisson stream at 70 % of the cluster's decode
capacity. Two routing policies drive the *same* replica model:

* ``lora-affinity``: ``routing.rank_replicas`` itself, fed what a real router sees: every
  replica's ``ReplicaState`` as of its last stats report (each replica reports every
  ``stats_period_s``, staggered), one ``RecentSends`` per ingress router (requests are spread over
  ``routers`` of them), the router's queue lengths as ``queue_lens``, and Serve's walk over the
  ranks (lowest queue length within a rank among replicas below ``max_ongoing``, next rank when
  all are full). Queue lengths are modelled as exact, for Serve's pick in both policies alike;
  real per-router caches lag a little where several routers share replicas.
* ``serve-default``: Ray Serve 2.60's ``PowerOfTwoChoicesRequestRouter`` with multiplexing: two
  random replicas among those that hold the adapter (a fresh view: Serve pushes model ids within
  ~0.1 s), the shorter queue of the two; when there is no holder or both are full, two random
  replicas among those with the fewest loaded models (retried a few times), then the least loaded.

Replica model: ``max_running`` requests decode at once (FIFO queue behind them), service times are
exponential with mean ``service_s``; a request whose adapter is not in the replica's slots loads
it first (``load_s`` added to its service, one slot taken, the least recently used adapter evicted:
each replica's slots are an LRU of ``slots`` adapters, as with ``@serve.multiplexed``). The time to
start (queue wait + load) stands in for time to first token. Loads run concurrently on a replica
for both policies, so the comparison is of routing only (Serve's one-load-at-a-time would only
make its numbers worse).

"Best possible" hit rate for the same total slot count S = replicas x slots, two definitions:

* ``static optimum``: keep the S most requested adapters of the trace loaded, one copy each,
  paying one load per adapter at first use. Under independent requests from a fixed popularity
  (what a Zipf trace is), this is the best long-run hit rate any online policy can reach (the
  classic A0 result), so it is the reference the "vs best" column uses. A cluster cannot quite
  reach it: a hot adapter needs copies on many replicas to have the capacity to serve it (the top
  adapter alone is ~8 % of the traffic, dozens of replicas' worth), and each copy takes a slot.
* ``Belady``: clairvoyant MIN on one cache of S slots (evict, or do not admit, the adapter needed
  furthest in the future). No routing can beat it: the union of all replicas' slots is a demand
  cache of at most S adapters, and every slot hit of a request is a hit of that union.

Speed: ranking 1,000 replicas in Python for each of a million requests would take an hour, so
the fast path runs ``rank_replicas`` on the holders only (most requests stop there) and walks the
non-holder ranks in numpy with the same keys as ``routing.placement_key``. ``SimConfig.exact``
ranks every replica on every request instead; the tests check that both make the same choices.
"""

from __future__ import annotations

import argparse
import heapq
import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from openlora_ray.serve.routing import RecentSends, RouterSettings, rank_replicas, stable_hash
from openlora_ray.serve.state import ReplicaState

log = logging.getLogger(__name__)

STATS_GROUPS = 20  # replicas report in this many staggered groups per stats period
DEFAULT_RETRIES = 3  # fewest-models power-of-two draws before Serve's default takes the least loaded


@dataclass(frozen=True)
class SimConfig:
    replicas: int = 1000
    slots: int = 16
    adapters: int = 100_000
    requests: int = 1_000_000
    zipf: float = 1.0
    seed: int = 0
    utilisation: float = 0.7  # offered decode load / capacity, before adapter loads
    max_running: int = 8
    max_ongoing: int = 16  # Serve's max_ongoing_requests per replica
    service_s: float = 5.0
    load_s: float = 0.3
    stats_period_s: float = 2.0
    routers: int = 4
    slot_mb: int = 256  # free VRAM reported = free slots x slot_mb
    exact: bool = False  # rank every replica on every request (slow; the tests' check of the fast path)


@dataclass(frozen=True)
class Trace:
    adapters: np.ndarray  # int32 adapter index per request (0 = most popular)
    arrivals: np.ndarray  # seconds, increasing
    service: np.ndarray  # decode seconds per request
    routers: np.ndarray  # which ingress router sees the request


@dataclass(frozen=True)
class PolicyResult:
    policy: str
    hit_rate: float
    loads: int
    affinity: float  # of requests whose adapter was in some slot, the share sent to a holder
    balance: float  # max / mean requests served per replica
    start_p50_s: float
    start_p99_s: float
    distinct_share: float  # distinct adapters in slots at the end / total slots (1 = no copies)
    top_copies: int  # replicas holding the most popular adapter at the end
    beyond_holders: int  # requests no holder took: cold, or spilled because the holders were busy/full
    overflows: int  # requests that found every candidate full (Serve would back off)
    wall_s: float


def make_trace(cfg: SimConfig) -> Trace:
    rng = np.random.default_rng(cfg.seed)
    weights = 1.0 / np.arange(1, cfg.adapters + 1, dtype=np.float64) ** cfg.zipf
    adapters = rng.choice(cfg.adapters, size=cfg.requests, p=weights / weights.sum()).astype(np.int32)
    rate = cfg.utilisation * cfg.replicas * cfg.max_running / cfg.service_s
    arrivals = np.cumsum(rng.exponential(1.0 / rate, cfg.requests))
    service = rng.exponential(cfg.service_s, cfg.requests)
    routers = rng.integers(0, cfg.routers, cfg.requests).astype(np.int32)
    return Trace(adapters, arrivals, service, routers)


def mix64_np(x: np.ndarray) -> np.ndarray:
    """``routing.mix64`` on a uint64 array (wrapping multiplication, like the masked Python ints)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _tiebreak(replica: int | np.ndarray, request: int) -> int | np.ndarray:
    """Serve breaks equal queue lengths by whichever probe answers first: a per-request shuffle."""
    return ((replica + 1) * 0x9E3779B1 ^ (request + 1) * 0x85EBCA77) & 0xFFFFFFFF


class Cluster:
    """The true state of the replicas: slots (LRU), running and queued requests, completions."""

    def __init__(self, cfg: SimConfig, trace: Trace) -> None:
        self.cfg = cfg
        self.trace = trace
        self.lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(cfg.replicas)]
        self.holders: dict[int, set[int]] = {}  # adapter -> replicas with it in a slot
        self.models = np.zeros(cfg.replicas, dtype=np.int64)  # adapters per replica
        self.running = [0] * cfg.replicas
        # running + queued: Serve's queue length. A list for scalar reads, an array for vector ones.
        self.ongoing = [0] * cfg.replicas
        self.ongoing_np = np.zeros(cfg.replicas, dtype=np.int64)
        self.waiting: list[deque[tuple[int, float]]] = [deque() for _ in range(cfg.replicas)]
        self.completions: list[tuple[float, int]] = []
        self.start_delay = np.zeros(cfg.requests)
        self.served = np.zeros(cfg.replicas, dtype=np.int64)
        self.hits = 0
        self.loads = 0
        self.resident_somewhere = 0

    def advance(self, now: float) -> None:
        """Finish every request that completes by ``now``; start queued ones in their place."""
        heap, trace = self.completions, self.trace
        while heap and heap[0][0] <= now:
            done_at, r = heapq.heappop(heap)
            self.ongoing[r] -= 1
            self.ongoing_np[r] -= 1
            if self.waiting[r]:
                j, busy_s = self.waiting[r].popleft()
                self.start_delay[j] += done_at - trace.arrivals[j]
                heapq.heappush(heap, (done_at + busy_s, r))
            else:
                self.running[r] -= 1

    def admit(self, i: int, r: int) -> None:
        """Request ``i`` reaches replica ``r``: slot hit or load (LRU eviction), then run or queue."""
        cfg, adapter, now = self.cfg, int(self.trace.adapters[i]), float(self.trace.arrivals[i])
        lru = self.lru[r]
        if self.holders.get(adapter):
            self.resident_somewhere += 1
        busy_s = float(self.trace.service[i])
        if adapter in lru:
            lru.move_to_end(adapter)
            self.hits += 1
        else:
            self.loads += 1
            busy_s += cfg.load_s
            self.start_delay[i] = cfg.load_s
            if len(lru) >= cfg.slots:
                victim, _ = lru.popitem(last=False)
                self.holders[victim].discard(r)
            else:
                self.models[r] += 1
            lru[adapter] = None
            self.holders.setdefault(adapter, set()).add(r)
        self.served[r] += 1
        self.ongoing[r] += 1
        self.ongoing_np[r] += 1
        if self.running[r] < cfg.max_running:
            self.running[r] += 1
            heapq.heappush(self.completions, (now + busy_s, r))
        else:
            self.waiting[r].append((i, busy_s))

    def pick(self, rank: Sequence[int], i: int) -> int:
        """Serve within one rank: the lowest queue below ``max_ongoing``; -1 when all are full."""
        best, best_key = -1, (0, 0)
        ongoing, cap = self.ongoing, self.cfg.max_ongoing
        for r in rank:
            q = ongoing[r]
            if q < cap:
                key = (q, _tiebreak(r, i))
                if best < 0 or key < best_key:
                    best, best_key = r, key
        return best

    def pick_np(self, rank: np.ndarray, i: int) -> int:
        """``pick`` over an index array."""
        q = self.ongoing_np[rank]
        ok = rank[q < self.cfg.max_ongoing]
        if ok.size == 0:
            return -1
        keys = (self.ongoing_np[ok] << 32) | _tiebreak(ok, i)
        return int(ok[np.argmin(keys)])

    def least_loaded(self) -> int:
        return int(np.argmin(self.ongoing_np))


class AffinityPolicy:
    """``rank_replicas`` on a stale, staggered view, one ``RecentSends`` per ingress router.

    Residency and free VRAM come from each replica's last stats report; load comes from the
    router's queue lengths (modelled as exact, as Serve's pick within a rank is, for both policies).
    """

    name = "lora-affinity"

    def __init__(self, cfg: SimConfig, settings: RouterSettings, cluster: Cluster) -> None:
        self.cfg, self.settings, self.cluster = cfg, settings, cluster
        self.ids = [f"replica-{r:04d}" for r in range(cfg.replicas)]
        self.index = {rid: r for r, rid in enumerate(self.ids)}
        self.replica_hash = np.array([stable_hash(rid) for rid in self.ids], dtype=np.uint64)
        self.recent = [RecentSends(settings.recent_ttl_s) for _ in range(cfg.routers)]
        self.view: list[ReplicaState] = [ReplicaState(rid) for rid in self.ids]
        self.view_holders: dict[str, set[int]] = {}
        self.vram_bucket = np.zeros(cfg.replicas, dtype=np.int64)
        self.beyond_holders = 0
        self.overflows = 0
        for r in range(cfg.replicas):
            self.report(r)

    def report(self, r: int) -> None:
        """Replica ``r`` reports its stats (through the same dict format as the real replica)."""
        c, cfg = self.cluster, self.cfg
        free_slots = cfg.slots - len(c.lru[r])
        state = ReplicaState(
            self.ids[r],
            resident=frozenset(f"adapter-{a}" for a in c.lru[r]),
            num_slots=cfg.slots,
            free_slots=free_slots,
            free_vram_mb=free_slots * cfg.slot_mb,
            queued=c.ongoing[r] - c.running[r],
            running=c.running[r],
            max_running=cfg.max_running,
        )
        state = ReplicaState.from_stats(self.ids[r], state.to_stats())
        old = self.view[r].resident
        for a in old - state.resident:
            holders = self.view_holders[a]
            holders.discard(r)
            if not holders:
                del self.view_holders[a]
        for a in state.resident - old:
            self.view_holders.setdefault(a, set()).add(r)
        self.view[r] = state
        self.vram_bucket[r] = state.free_vram_mb // self.settings.vram_bucket_mb

    def stats_group(self, group: int) -> None:
        for r in range(group, self.cfg.replicas, STATS_GROUPS):
            self.report(r)

    def choose(self, i: int) -> int:
        trace = self.cluster.trace
        adapter = f"adapter-{trace.adapters[i]}"
        now = float(trace.arrivals[i])
        recent_sends = self.recent[trace.routers[i]]
        recent = recent_sends.replicas_for(adapter, now)
        if self.cfg.exact:
            queue_lens = dict(zip(self.ids, self.cluster.ongoing))
            r = self._walk(rank_replicas(adapter, self.view, self.settings, recent, queue_lens), i)
        else:
            r = self._choose_fast(adapter, recent, i)
        if r < 0:
            self.overflows += 1
            r = self.cluster.least_loaded()
        recent_sends.record(adapter, self.ids[r], now)
        return r

    def _walk(self, ranks: list[list[str]], i: int) -> int:
        """Serve's walk: the first rank with a replica below ``max_ongoing`` picks its shortest queue."""
        for rank in ranks:
            r = self.cluster.pick([self.index[x] for x in rank], i)
            if r >= 0:
                return r
        return -1

    def _choose_fast(self, adapter: str, recent: frozenset[str], i: int) -> int:
        """The same choice as ranking every replica, at the cost of ranking the holders only.

        ``rank_replicas`` on the holders gives the holder ranks; the non-holder ranks (strict
        singletons by ``placement_key``, then the rest, then busy holders, then busy non-holders)
        are walked in numpy with the same keys.
        """
        c, settings = self.cluster, self.settings
        holders = set(self.view_holders.get(adapter, ()))
        holders.update(self.index[rid] for rid in recent)
        ordered = sorted(holders)
        queue_lens = {self.ids[r]: c.ongoing[r] for r in ordered}
        ranks = rank_replicas(adapter, [self.view[r] for r in ordered], settings, recent, queue_lens)
        busy_holders: list[int] = []
        for rank in ranks:
            idx = [self.index[x] for x in rank]
            if c.ongoing[idx[0]] / self.cfg.max_running >= settings.spill_load:
                busy_holders = idx  # the last holder rank; non-holders below the threshold go first
                break
            r = c.pick(idx, i)
            if r >= 0:
                return r
        self.beyond_holders += 1
        load = c.ongoing_np / self.cfg.max_running
        busy = load >= settings.spill_load
        non_holder = np.ones(self.cfg.replicas, dtype=bool)
        non_holder[ordered] = False
        free = np.flatnonzero(non_holder & ~busy)
        hrw = mix64_np(np.uint64(stable_hash(adapter)) ^ self.replica_hash[free])
        neg_load_bucket = -np.floor(load[free] / settings.load_bucket).astype(np.int64)
        order = np.lexsort((hrw, neg_load_bucket, self.vram_bucket[free]))[::-1]
        strict = free[order[: settings.strict_ranks]]
        for r in strict.tolist():
            if c.ongoing[r] < self.cfg.max_ongoing:
                return r
        for rank in (free[order[settings.strict_ranks :]], np.array(busy_holders, dtype=np.int64), np.flatnonzero(non_holder & busy)):
            r = c.pick_np(rank, i)
            if r >= 0:
                return r
        return -1


class ServeDefaultPolicy:
    """Ray Serve 2.60's default router with multiplexing (power of two choices)."""

    name = "serve-default"

    def __init__(self, cfg: SimConfig, cluster: Cluster) -> None:
        self.cfg, self.cluster = cfg, cluster
        self.rng = random.Random(cfg.seed + 1)
        self.beyond_holders = 0
        self.overflows = 0

    def _two(self, candidates: Sequence[int], i: int) -> int:
        pair = candidates if len(candidates) <= 2 else self.rng.sample(candidates, 2)
        return self.cluster.pick(pair, i)

    def choose(self, i: int) -> int:
        c = self.cluster
        holders = c.holders.get(int(c.trace.adapters[i]))
        if holders:
            r = self._two(tuple(holders), i)
            if r >= 0:
                return r
        self.beyond_holders += 1
        fewest = np.flatnonzero(c.models == c.models.min()).tolist()
        for _ in range(DEFAULT_RETRIES):
            r = self._two(fewest, i)
            if r >= 0:
                return r
        self.overflows += 1
        return c.least_loaded()


def simulate(cfg: SimConfig, trace: Trace, policy_name: str, settings: RouterSettings) -> tuple[PolicyResult, np.ndarray]:
    """Run one policy over the trace; returns its result and the replica chosen for each request."""
    started = time.perf_counter()
    cluster = Cluster(cfg, trace)
    policy: AffinityPolicy | ServeDefaultPolicy
    if policy_name == AffinityPolicy.name:
        policy = AffinityPolicy(cfg, settings, cluster)
        tick_s = cfg.stats_period_s / STATS_GROUPS
    else:
        policy = ServeDefaultPolicy(cfg, cluster)
        tick_s = float("inf")  # its view (Serve's pushed model ids) is fresh: nothing to report
    chosen = np.empty(cfg.requests, dtype=np.int32)
    next_tick, tick_no = tick_s, 0
    arrivals = trace.arrivals
    for i in range(cfg.requests):
        now = arrivals[i]
        while next_tick <= now:
            cluster.advance(next_tick)
            policy.stats_group(tick_no % STATS_GROUPS)
            tick_no += 1
            next_tick += tick_s
        cluster.advance(now)
        r = policy.choose(i)
        cluster.admit(i, r)
        chosen[i] = r
        if (i + 1) % 200_000 == 0:
            log.info("%s: %d/%d requests, %.0f s", policy_name, i + 1, cfg.requests, time.perf_counter() - started)
    cluster.advance(float("inf"))
    distinct = sum(1 for h in cluster.holders.values() if h)
    result = PolicyResult(
        policy=policy_name,
        hit_rate=cluster.hits / cfg.requests,
        loads=cluster.loads,
        affinity=cluster.hits / max(1, cluster.resident_somewhere),
        balance=float(cluster.served.max() / cluster.served.mean()),
        start_p50_s=float(np.percentile(cluster.start_delay, 50)),
        start_p99_s=float(np.percentile(cluster.start_delay, 99)),
        distinct_share=distinct / (cfg.replicas * cfg.slots),
        top_copies=len(cluster.holders.get(0, ())),
        beyond_holders=policy.beyond_holders,
        overflows=policy.overflows,
        wall_s=time.perf_counter() - started,
    )
    return result, chosen


def static_optimum_hits(adapters: np.ndarray, slots: int) -> int:
    """Hits of keeping the ``slots`` most requested adapters loaded (one load each at first use)."""
    counts = np.sort(np.bincount(adapters))[::-1][:slots]
    return int(np.clip(counts - 1, 0, None).sum())


def belady_hits(adapters: np.ndarray, slots: int) -> int:
    """Hits of clairvoyant MIN with bypass on one cache of ``slots`` adapters."""
    n = len(adapters)
    never = n  # "next use" of a request whose adapter is not requested again
    order = np.argsort(adapters, kind="stable")
    same = adapters[order[1:]] == adapters[order[:-1]]
    next_use = np.full(n, never, dtype=np.int64)
    next_use[order[:-1][same]] = order[1:][same]
    cache: dict[int, int] = {}
    heap: list[tuple[int, int]] = []  # (-next use, adapter), stale entries skipped lazily
    hits = 0
    for a, nu in zip(adapters.tolist(), next_use.tolist()):
        if a in cache:
            hits += 1
        elif nu == never:
            continue
        elif len(cache) >= slots:
            while -heap[0][0] != cache.get(heap[0][1]):
                heapq.heappop(heap)
            if -heap[0][0] <= nu:
                continue  # the newcomer is needed last: do not admit it
            del cache[heapq.heappop(heap)[1]]
        cache[a] = nu
        heapq.heappush(heap, (-nu, a))
    return hits


def run(cfg: SimConfig, settings: RouterSettings) -> dict:
    """Both policies and both bounds on one trace; returns the JSON payload."""
    t0 = time.perf_counter()
    trace = make_trace(cfg)
    log.info("trace: %d requests over %.0f s simulated (%.1f s to build)", cfg.requests, trace.arrivals[-1], time.perf_counter() - t0)
    total_slots = cfg.replicas * cfg.slots
    static = static_optimum_hits(trace.adapters, total_slots)
    belady = belady_hits(trace.adapters, total_slots)
    results = [simulate(cfg, trace, name, settings)[0] for name in (AffinityPolicy.name, ServeDefaultPolicy.name)]
    return {
        "config": asdict(cfg),
        "router_settings": settings.model_dump(),
        "simulated_s": float(trace.arrivals[-1]),
        "distinct_adapters_requested": int(np.unique(trace.adapters).size),
        "static_optimum": {"hit_rate": static / cfg.requests, "loads": cfg.requests - static},
        "belady": {"hit_rate": belady / cfg.requests, "loads": cfg.requests - belady},
        "policies": [asdict(r) for r in results],
    }


def register_bench(benches: argparse._SubParsersAction) -> None:
    """Add ``routing-sim`` to ``openlora-ray bench``'s subcommands."""
    d = SimConfig()
    s = RouterSettings()
    p = benches.add_parser("routing-sim", help="routing policy at scale vs Serve's default and the best possible hit rate")
    p.add_argument("--replicas", type=int, default=d.replicas)
    p.add_argument("--slots", type=int, default=d.slots, help="adapter slots per replica (default: %(default)s)")
    p.add_argument("--adapters", type=int, default=d.adapters)
    p.add_argument("--requests", type=int, default=d.requests)
    p.add_argument("--zipf", type=float, default=d.zipf, help="Zipf exponent of adapter popularity")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--utilisation", type=float, default=d.utilisation, help="offered load / decode capacity")
    p.add_argument("--max-running", type=int, default=d.max_running, help="requests decoding at once per replica")
    p.add_argument("--max-ongoing", type=int, default=d.max_ongoing, help="Serve's max_ongoing_requests")
    p.add_argument("--service-s", type=float, default=d.service_s, help="mean decode time of a request")
    p.add_argument("--load-s", type=float, default=d.load_s, help="time to load an adapter into a slot")
    p.add_argument("--stats-period-s", type=float, default=d.stats_period_s)
    p.add_argument("--routers", type=int, default=d.routers, help="ingress replicas routing independently")
    p.add_argument("--spill-load", type=float, default=s.spill_load)
    p.add_argument("--out", type=Path, default=Path("bench-results/routing-sim.json"))
    p.set_defaults(func=run_routing_sim)


def run_routing_sim(args: argparse.Namespace) -> int:
    from openlora_ray.bench.timing import print_table, write_json

    cfg = SimConfig(
        replicas=args.replicas, slots=args.slots, adapters=args.adapters, requests=args.requests, zipf=args.zipf,
        seed=args.seed, utilisation=args.utilisation, max_running=args.max_running, max_ongoing=args.max_ongoing,
        service_s=args.service_s, load_s=args.load_s, stats_period_s=args.stats_period_s, routers=args.routers,
    )
    settings = RouterSettings(spill_load=args.spill_load, recent_ttl_s=2 * args.stats_period_s)
    payload = run(cfg, settings)
    best = payload["static_optimum"]["hit_rate"]
    default_loads = next(p["loads"] for p in payload["policies"] if p["policy"] == ServeDefaultPolicy.name)
    rows: list[list[object]] = [
        [p["policy"], p["hit_rate"], p["hit_rate"] / best, p["loads"], p["loads"] / default_loads, p["affinity"],
         p["balance"], p["start_p50_s"], p["start_p99_s"], p["distinct_share"], p["top_copies"]]
        for p in payload["policies"]
    ]
    for name in ("static_optimum", "belady"):
        b = payload[name]
        rows.append([name.replace("_", " "), b["hit_rate"], b["hit_rate"] / best, b["loads"], b["loads"] / default_loads,
                     "", "", "", "", "", ""])
    print_table(
        ["policy", "hit rate", "vs static opt", "loads", "vs default", "affinity", "max/mean", "start p50 s",
         "start p99 s", "distinct", "top copies"],
        rows,
    )
    write_json(args.out, payload)
    return 0
