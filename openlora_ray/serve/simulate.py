"""``openlora-ray bench routing-sim``: the routing policy at scale, in a discrete-event simulator.

Default scale (issue 5): 1,000 replicas with 16 adapter slots each, 100,000 adapters, a seeded
Zipf(1.0) trace of 1,000,000 requests arriving as a Poisson stream at 70 % of the cluster's decode
capacity. Two routing policies drive the *same* replica model:

* ``lora-affinity``: ``routing_index.RoutingIndex.rank`` itself (what ``LoraAffinityRouter`` calls), fed
  what a real router sees: every replica's ``ReplicaState`` as of its last stats report (each
  replica reports every ``stats_period_s``, staggered), one ``RecentSends`` and one
  ``Popularity`` per ingress router (requests are spread over ``routers`` of them), that
  router's queue-length cache for the replicas it sent to within ``queue_len_trust_s``, and
  Serve's walk over the ranks (lowest queue length within a rank among replicas below
  ``max_ongoing``, next rank when all are full). ``SimConfig.exact`` ranks with the O(replicas)
  reference ``rank_replicas`` instead; the tests check that both make the same choices.
* ``serve-default``: Ray Serve 2.60's ``PowerOfTwoChoicesRequestRouter`` with multiplexing: two
  random replicas among those that hold the adapter (a fresh view: Serve pushes model ids within
  ~0.1 s), the shorter queue of the two; when there is no holder or both are full, two random
  replicas among those with the fewest loaded models (retried a few times), then the least loaded.

Replica model: ``max_running`` requests decode at once (FIFO queue behind them), service times are
exponential with mean ``service_s``; a request whose adapter is not in the replica's slots loads
it first, one slot taken, the least recently used adapter evicted (each replica's slots are an
LRU of ``slots`` adapters, as with ``@serve.multiplexed``), or with ``eviction_half_life_s`` the
adapter the replica was asked for least lately (its own request counts, decayed: the engine's
``SlotManager`` rule with ``EngineSettings.slot_eviction_half_life_s``). The load takes ``host_load_s`` when
the adapter is in the replica's host-RAM tier (an LRU of ``host_slots`` adapters, fed by every
load) and ``load_s`` from the store otherwise. The time to start (queue wait + load) stands in
for time to first token. Loads run concurrently on a replica for both policies, so the comparison
is of routing only (Serve's one-load-at-a-time would only make its numbers worse).

Queue lengths as Serve keeps them, for both policies: each router has its own cache of each
replica's ongoing requests, set to the replica's count when it accepts a request from that
router, decremented when one of that router's requests completes, probed afresh once older than
``queue_cache_s`` (Serve's 10 s default). Other routers' sends and completions are unseen until
then, so with several ingress routers the caches drift; Serve's pick within a rank reads them,
probes the replicas an entry shows full when no other replica of the rank is below
``max_ongoing``, and a replica found full on sending rejects the request, which corrects the entry.

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

from openlora_ray.lora.slots import RequestCounts, SlotState, choose_slot
from openlora_ray.serve.decision_bench import run_decision_time
from openlora_ray.serve.router_memory import Popularity, RecentSends
from openlora_ray.serve.routing import RouterSettings, RoutingInputs, Tier, holder_tier, rank_replicas
from openlora_ray.serve.routing_index import RoutingIndex
from openlora_ray.serve.state import ReplicaState

log = logging.getLogger(__name__)

STATS_GROUPS = 20  # replicas report in this many staggered groups per stats period
DEFAULT_RETRIES = 3  # fewest-models power-of-two draws before Serve's default takes the least loaded
QUEUE_CACHE_TIMEOUT_S = 10.0  # Serve 2.60's RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S default


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
    load_s: float = 0.3  # a slot load from the store (through the node's disk cache)
    host_slots: int = 64  # adapters each replica keeps in host RAM (0: no host tier)
    host_load_s: float = 0.005  # a slot load from host RAM
    stats_period_s: float = 2.0
    routers: int = 4
    queue_cache_s: float = QUEUE_CACHE_TIMEOUT_S  # 0: every router sees exact queue lengths
    eviction_half_life_s: float = 0.0  # 0: a replica evicts its least recently used slot; else its
    # least requested one lately, by its own request counts halving this often (the engine's
    # slot_eviction_half_life_s)
    slot_mb: int = 256  # free VRAM reported = free slots x slot_mb
    exact: bool = False  # rank with the O(replicas) reference instead of the index (the tests' check)


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
    loads: int  # slot loads: host + store
    store_loads: int  # slot loads the host tier could not serve
    affinity: float  # of requests whose adapter was in some slot, the share sent to a holder
    balance: float  # max / mean requests served per replica
    start_p50_s: float
    start_p99_s: float
    distinct_share: float  # distinct adapters in slots at the end / total slots (1 = no copies)
    top_copies: int  # replicas holding the most popular adapter at the end
    beyond_holders: int  # requests no holder took: cold, or spilled because the holders were busy/full
    overflows: int  # requests that found every candidate full (Serve would back off)
    decision_us_mean: float  # time to rank one request (0 for serve-default: not our code)
    decision_us_p99: float
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


def _tiebreak(replica: int | np.ndarray, request: int) -> int | np.ndarray:
    """Serve breaks equal queue lengths by whichever probe answers first: a per-request shuffle."""
    return ((replica + 1) * 0x9E3779B1 ^ (request + 1) * 0x85EBCA77) & 0xFFFFFFFF


class Cluster:
    """The true state of the replicas (slots and host tier as LRUs, running and queued requests,
    completions) and each router's cache of their queue lengths."""

    def __init__(self, cfg: SimConfig, trace: Trace) -> None:
        self.cfg = cfg
        self.trace = trace
        self.lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(cfg.replicas)]
        self.now = 0.0  # the time of the request being admitted (the replicas' request counts' clock)
        self.requested = (
            [RequestCounts(cfg.eviction_half_life_s, clock=lambda: self.now) for _ in range(cfg.replicas)]
            if cfg.eviction_half_life_s
            else []
        )
        self.host: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(cfg.replicas)]
        self.holders: dict[int, set[int]] = {}  # adapter -> replicas with it in a slot
        self.models = np.zeros(cfg.replicas, dtype=np.int64)  # adapters per replica
        self.running = [0] * cfg.replicas
        # running + queued: Serve's queue length. A list for scalar reads, an array for vector ones.
        self.ongoing = [0] * cfg.replicas
        self.ongoing_np = np.zeros(cfg.replicas, dtype=np.int64)
        # Each router's queue-length cache (Serve's ReplicaQueueLengthCache): set to the replica's
        # count when it accepts a request from that router, decremented when one of that router's
        # requests completes, probed afresh once older than queue_cache_s. Other routers' sends
        # and completions stay unseen until then.
        self.cached_q = np.zeros((cfg.routers, cfg.replicas), dtype=np.int64)
        self.cached_at = np.full((cfg.routers, cfg.replicas), -np.inf)
        self.sent_at = np.full((cfg.routers, cfg.replicas), -np.inf)  # each router's last send
        self.waiting: list[deque[tuple[int, float]]] = [deque() for _ in range(cfg.replicas)]
        self.completions: list[tuple[float, int, int]] = []  # (time, replica, request)
        self.start_delay = np.zeros(cfg.requests)
        self.served = np.zeros(cfg.replicas, dtype=np.int64)
        self.hits = 0
        self.loads = 0
        self.store_loads = 0
        self.resident_somewhere = 0

    def advance(self, now: float) -> None:
        """Finish every request that completes by ``now``; start queued ones in their place."""
        heap, trace = self.completions, self.trace
        while heap and heap[0][0] <= now:
            done_at, r, i = heapq.heappop(heap)
            self.ongoing[r] -= 1
            self.ongoing_np[r] -= 1
            k = trace.routers[i]
            if done_at - self.cached_at[k, r] <= self.cfg.queue_cache_s:
                self.cached_q[k, r] = max(0, self.cached_q[k, r] - 1)
                self.cached_at[k, r] = done_at
            if self.waiting[r]:
                j, busy_s = self.waiting[r].popleft()
                self.start_delay[j] += done_at - trace.arrivals[j]
                heapq.heappush(heap, (done_at + busy_s, r, j))
            else:
                self.running[r] -= 1

    def queue_len(self, router: int, r: int, now: float) -> int | None:
        """Router ``router``'s cached queue length of replica ``r``, None once stale."""
        if now - self.cached_at[router, r] <= self.cfg.queue_cache_s:
            return int(self.cached_q[router, r])
        return None

    def admit(self, i: int, r: int) -> None:
        """Request ``i`` reaches replica ``r``: slot hit, or a load from host RAM or the store
        (LRU eviction of a slot), then run or queue."""
        cfg, adapter, now = self.cfg, int(self.trace.adapters[i]), float(self.trace.arrivals[i])
        lru, host = self.lru[r], self.host[r]
        if self.holders.get(adapter):
            self.resident_somewhere += 1
        busy_s = float(self.trace.service[i])
        if adapter in lru:
            lru.move_to_end(adapter)
            self.hits += 1
        else:
            self.loads += 1
            load_s = cfg.host_load_s if adapter in host else cfg.load_s
            self.store_loads += adapter not in host
            busy_s += load_s
            self.start_delay[i] = load_s
            if len(lru) >= cfg.slots:
                victim = self._victim(r)
                del lru[victim]
                self.holders[victim].discard(r)
            else:
                self.models[r] += 1
            lru[adapter] = None
            self.holders.setdefault(adapter, set()).add(r)
        if self.requested:
            self.now = now
            self.requested[r].record(str(adapter))
        if cfg.host_slots:
            host[adapter] = None
            host.move_to_end(adapter)
            if len(host) > cfg.host_slots:
                host.popitem(last=False)
        self.served[r] += 1
        self.ongoing[r] += 1
        self.ongoing_np[r] += 1
        k = self.trace.routers[i]
        self.cached_q[k, r], self.cached_at[k, r] = self.ongoing[r], now  # the replica's accept reports it
        self.sent_at[k, r] = now
        if self.running[r] < cfg.max_running:
            self.running[r] += 1
            heapq.heappush(self.completions, (now + busy_s, r, i))
        else:
            self.waiting[r].append((i, busy_s))

    def _victim(self, r: int) -> int:
        """The slot replica ``r`` evicts: its least recently used, or with ``eviction_half_life_s``
        the engine's rule (``lora.slots.choose_slot`` over its request counts)."""
        if not self.requested:
            return next(iter(self.lru[r]))
        residents = list(self.lru[r])  # least recently used first
        counts = self.requested[r]
        slot = choose_slot([SlotState(str(a), 0, t, counts.scaled(str(a))) for t, a in enumerate(residents)])
        return residents[slot if slot is not None else 0]

    def pick(self, rank: Sequence[int], i: int) -> int:
        """Serve within one rank (``RequestRouter._select_from_candidate_replicas``): the lowest
        queue length below ``max_ongoing`` as the request's router sees it (a stale entry is
        probed: the true figure). When every entry says full, those not probed yet are probed
        (Serve probes replicas it has cached as full rather than wait for their entries to expire).
        A replica that turns out full rejects, which corrects the cache, and the pick repeats.
        -1 when all are full."""
        if len(rank) > 32:
            return self.pick_np(np.array(rank, dtype=np.int64), i)
        k, now, cap = self.trace.routers[i], float(self.trace.arrivals[i]), self.cfg.max_ongoing
        seen: dict[int, int] = {}
        cached: list[int] = []  # replicas whose figure is the cache's, not a probe's
        for r in rank:
            q = self.queue_len(k, r, now)
            if q is None:
                seen[r] = self._probe(k, r, now)
            else:
                seen[r] = q
                cached.append(r)
        while True:
            best, best_key = -1, (0, 0)
            for r, q in seen.items():
                if q < cap:
                    key = (q, _tiebreak(r, i))
                    if best < 0 or key < best_key:
                        best, best_key = r, key
            if best < 0 and cached:
                for r in cached:
                    seen[r] = self._probe(k, r, now)
                cached = []
                continue
            if best < 0 or self.ongoing[best] < cap:
                return best
            seen[best] = self._probe(k, best, now)

    def _probe(self, k: int, r: int, now: float) -> int:
        self.cached_q[k, r], self.cached_at[k, r] = self.ongoing[r], now
        return self.ongoing[r]

    def pick_np(self, rank: np.ndarray, i: int) -> int:
        """``pick`` over an index array."""
        k, now, cap = self.trace.routers[i], float(self.trace.arrivals[i]), self.cfg.max_ongoing
        fresh = now - self.cached_at[k, rank] <= self.cfg.queue_cache_s
        q = np.where(fresh, self.cached_q[k, rank], self.ongoing_np[rank])
        self.cached_q[k, rank[~fresh]], self.cached_at[k, rank[~fresh]] = self.ongoing_np[rank[~fresh]], now
        probed_all = False
        while True:
            ok = np.flatnonzero(q < cap)
            if ok.size == 0:
                if probed_all:
                    return -1
                q = self.ongoing_np[rank].copy()
                self.cached_q[k, rank], self.cached_at[k, rank] = q, now
                probed_all = True
                continue
            keys = (q[ok] << 32) | _tiebreak(rank[ok], i)
            at = int(ok[np.argmin(keys)])
            best = int(rank[at])
            if self.ongoing[best] < cap:
                return best
            q[at] = self._probe(k, best, now)

    def least_loaded(self) -> int:
        return int(np.argmin(self.ongoing_np))


class RouterQueueLens:
    """One router's cached queue lengths as ``routing.replica_load`` reads them: only those of
    replicas it sent to within ``trust_s`` (as ``LoraAffinityRouter`` passes them)."""

    def __init__(self, cluster: Cluster, index: dict[str, int], router: int, now: float, trust_s: float) -> None:
        self.cluster, self.index, self.router, self.now, self.trust_s = cluster, index, router, now, trust_s

    def get(self, replica_id: str, /) -> int | None:
        r = self.index[replica_id]
        if self.now - self.cluster.sent_at[self.router, r] > self.trust_s:
            return None
        return self.cluster.queue_len(self.router, r, self.now)


class AffinityPolicy:
    """The router's policy (``RoutingIndex.rank``) on a stale, staggered view, one ``RecentSends``
    and one ``Popularity`` per ingress router, loads from that router's queue-length cache."""

    name = "lora-affinity"

    def __init__(self, cfg: SimConfig, settings: RouterSettings, cluster: Cluster) -> None:
        self.cfg, self.settings, self.cluster = cfg, settings, cluster
        self.ids = [f"replica-{r:04d}" for r in range(cfg.replicas)]
        self.index = {rid: r for r, rid in enumerate(self.ids)}
        self.recent = [RecentSends(settings.recent_ttl_s) for _ in range(cfg.routers)]
        self.popularity = [Popularity(settings.popularity_half_life_s) for _ in range(cfg.routers)]
        self.view = RoutingIndex()
        self.view.set_replicas(self.ids)
        self.beyond_holders = 0
        self.overflows = 0
        self.decision_s: list[float] = []
        for r in range(cfg.replicas):
            self.report(r)

    def report(self, r: int) -> None:
        """Replica ``r`` reports its stats (through the same dict format as the real replica)."""
        c, cfg = self.cluster, self.cfg
        free_slots = cfg.slots - len(c.lru[r])
        state = ReplicaState(
            self.ids[r],
            resident=frozenset(f"adapter-{a}" for a in c.lru[r]),
            host=frozenset(f"adapter-{a}" for a in c.host[r]),
            num_slots=cfg.slots,
            free_slots=free_slots,
            free_vram_mb=free_slots * cfg.slot_mb,
            queued=c.ongoing[r] - c.running[r],
            running=c.running[r],
            max_running=cfg.max_running,
        )
        self.view.update(ReplicaState.from_stats(self.ids[r], state.to_stats()))

    def stats_group(self, group: int) -> None:
        for r in range(group, self.cfg.replicas, STATS_GROUPS):
            self.report(r)

    def choose(self, i: int) -> int:
        trace, c = self.cluster.trace, self.cluster
        adapter = f"adapter-{trace.adapters[i]}"
        now = float(trace.arrivals[i])
        k = int(trace.routers[i])
        self.popularity[k].record(adapter, now)
        inputs = RoutingInputs(
            recent=self.recent[k].replicas_for(adapter, now),
            queue_lens=RouterQueueLens(c, self.index, k, now, self.settings.queue_len_trust_s),
            popularity=self.popularity[k],
            now=now,
            draw=(i * 0x9E3779B1) & 0xFFFFFFFF,
        )
        started = time.perf_counter()
        if self.cfg.exact:
            states = [self.view.state(rid) for rid in self.ids]
            ranks = rank_replicas(adapter, states, self.settings, inputs)
        else:
            ranks = self.view.rank(adapter, self.settings, inputs)
        self.decision_s.append(time.perf_counter() - started)
        r = self._walk(ranks, i)
        if r < 0:
            self.overflows += 1
            r = c.least_loaded()
        self.beyond_holders += holder_tier(adapter, self.view.state(self.ids[r]), inputs.recent) is Tier.NONE
        self.recent[k].record(adapter, self.ids[r], now)
        return r

    def _walk(self, ranks: list[list[str]], i: int) -> int:
        """Serve's walk: the first rank with a replica below ``max_ongoing`` picks its shortest queue."""
        for rank in ranks:
            r = self.cluster.pick([self.index[x] for x in rank], i)
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
        self.decision_s: list[float] = []

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
    decisions = np.array(policy.decision_s) * 1e6 if policy.decision_s else np.zeros(1)
    result = PolicyResult(
        policy=policy_name,
        hit_rate=cluster.hits / cfg.requests,
        loads=cluster.loads,
        store_loads=cluster.store_loads,
        affinity=cluster.hits / max(1, cluster.resident_somewhere),
        balance=float(cluster.served.max() / cluster.served.mean()),
        start_p50_s=float(np.percentile(cluster.start_delay, 50)),
        start_p99_s=float(np.percentile(cluster.start_delay, 99)),
        distinct_share=distinct / (cfg.replicas * cfg.slots),
        top_copies=len(cluster.holders.get(0, ())),
        beyond_holders=policy.beyond_holders,
        overflows=policy.overflows,
        decision_us_mean=float(decisions.mean()),
        decision_us_p99=float(np.percentile(decisions, 99)),
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


def run(cfg: SimConfig, settings: RouterSettings, policies: Sequence[str] = (AffinityPolicy.name, ServeDefaultPolicy.name)) -> dict:
    """The policies and both bounds on one trace; returns the JSON payload."""
    t0 = time.perf_counter()
    trace = make_trace(cfg)
    log.info("trace: %d requests over %.0f s simulated (%.1f s to build)", cfg.requests, trace.arrivals[-1], time.perf_counter() - t0)
    total_slots = cfg.replicas * cfg.slots
    static = static_optimum_hits(trace.adapters, total_slots)
    belady = belady_hits(trace.adapters, total_slots)
    results = [simulate(cfg, trace, name, settings)[0] for name in policies]
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
    p.add_argument("--load-s", type=float, default=d.load_s, help="time to load an adapter from the store into a slot")
    p.add_argument("--host-slots", type=int, default=d.host_slots, help="adapters per replica in host RAM (0: none)")
    p.add_argument("--host-load-s", type=float, default=d.host_load_s, help="time to load an adapter from host RAM")
    p.add_argument("--eviction-half-life-s", type=float, default=d.eviction_half_life_s,
                   help="0: replicas evict the least recently used slot; else the least requested lately, "
                   "counts halving this often (the engine's slot_eviction_half_life_s)")
    p.add_argument("--stats-period-s", type=float, default=d.stats_period_s)
    p.add_argument("--routers", type=int, default=d.routers, help="ingress replicas routing independently")
    p.add_argument("--queue-cache-s", type=float, default=d.queue_cache_s, help="Serve's queue-length cache timeout")
    p.add_argument("--spill-load", type=float, default=s.spill_load)
    p.add_argument("--holder-sample", type=int, default=s.holder_sample, help="idle slot holders ranked first")
    p.add_argument("--policies", nargs="+", default=[AffinityPolicy.name, ServeDefaultPolicy.name],
                   choices=[AffinityPolicy.name, ServeDefaultPolicy.name])
    p.add_argument("--decision-time", action="store_true",
                   help="instead of simulating: time the policy's decisions on a steady-state view of "
                   "--replicas x --slots (see serve.decision_bench)")
    p.add_argument("--decisions", type=int, default=20_000, help="decisions timed with --decision-time")
    p.add_argument("--out", type=Path, default=Path("bench-results/routing-sim.json"))
    p.set_defaults(func=run_routing_sim)


def run_routing_sim(args: argparse.Namespace) -> int:
    from openlora_ray.bench.timing import print_table, write_json

    if args.decision_time:
        return run_decision_time(args)
    cfg = SimConfig(
        replicas=args.replicas, slots=args.slots, adapters=args.adapters, requests=args.requests, zipf=args.zipf,
        seed=args.seed, utilisation=args.utilisation, max_running=args.max_running, max_ongoing=args.max_ongoing,
        service_s=args.service_s, load_s=args.load_s, host_slots=args.host_slots, host_load_s=args.host_load_s,
        eviction_half_life_s=args.eviction_half_life_s,
        stats_period_s=args.stats_period_s, routers=args.routers, queue_cache_s=args.queue_cache_s,
    )
    settings = RouterSettings(
        spill_load=args.spill_load, recent_ttl_s=2 * args.stats_period_s, holder_sample=args.holder_sample
    )
    payload = run(cfg, settings, args.policies)
    best = payload["static_optimum"]["hit_rate"]
    rows: list[list[object]] = [
        [p["policy"], p["hit_rate"], p["hit_rate"] / best, p["loads"], p["store_loads"], p["affinity"], p["balance"],
         p["start_p50_s"], p["start_p99_s"], p["distinct_share"], p["top_copies"],
         p["decision_us_mean"] or "", p["decision_us_p99"] or ""]
        for p in payload["policies"]
    ]
    for name in ("static_optimum", "belady"):
        b = payload[name]
        rows.append([name.replace("_", " "), b["hit_rate"], b["hit_rate"] / best, b["loads"], *[""] * 9])
    print_table(
        ["policy", "hit rate", "vs static opt", "slot loads", "store loads", "affinity", "max/mean", "start p50 s",
         "start p99 s", "distinct", "top copies", "decision us", "decision p99 us"],
        rows,
    )
    write_json(args.out, payload)
    return 0
