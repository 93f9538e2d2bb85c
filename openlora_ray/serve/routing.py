"""The adapter-affinity routing policy: pure functions from (adapter, replica states) to ranks.

Ray Serve's ``RequestRouter`` contract is "return ranks, best first; within a rank Serve picks the
replica with the shortest queue (from its own queue-length cache), and moves to the next rank when
every replica of a rank is at ``max_ongoing_requests``". The policy therefore encodes *preference*
in the rank order and leaves *least loaded among equals* to Serve. It has no Ray import so that it
is unit-tested and simulated at scale (``openlora_ray.serve.simulate``) without a cluster.

Order for a request naming an adapter (each non-empty group is one rank unless said otherwise):

1. replicas with the adapter in a device slot, not busy;
2. then those loading it (reported, or sent it by this router within ``recent_ttl_s``),
   then those with it in host RAM, then on local disk; all not busy.
   Loading comes before host/disk because that replica has already spent a slot on the adapter:
   sending the request elsewhere would spend a second one;
3. non-holders that are not busy: the first ``strict_ranks`` of them one per rank, in placement
   order (most free VRAM, then lowest load, then the adapter's rendezvous hash: see
   ``placement_key``), the rest as one rank. This is where a cold adapter lands, and where a hot
   adapter *spills* once every holder is busy; the spill target then reports the
   adapter and becomes a holder, so holders grow with load. They shrink when replicas evict the
   adapter (LRU, on their own) and stop reporting it;
4. busy holders (one rank: the least loaded of them);
5. busy non-holders (one rank).

A replica is *busy* for a request when its load reached ``spill_load``, or when the request would
wait for a slot there (``waits_for_slot``): every slot is held by another adapter that requests
in flight are using. Such a request cannot start until one of those requests finishes, which
costs a whole generation; loading the adapter on a replica with an idle slot costs a copy from
host RAM, disk or the store. The slots in use come from the requests
this router has in flight (``InFlight``: exact with one ingress replica, a lower bound with
several), not from the stats, which lag by a period while requests last about as long.

Residency and free VRAM come from the replicas' stats (a stats period old). Load comes from the
router's own queue length for the replica where it has one (``queue_lens``: Serve's per-router
cache, bumped on every send), else from the stats: the at-scale simulation showed that spilling on
load two seconds stale builds queues on hot replicas and herds cold adapters onto whichever
replicas looked idle when the stats were taken.

Why the rendezvous hash: ingress replicas route independently. Free VRAM and load are bucketed
(``vram_bucket_mb``, ``load_bucket``) so replicas that are about equal tie, and the tie goes to
the highest ``hrw_score(adapter, replica)``: routers with the same view send concurrent cold
requests for one adapter to the same replica, while different adapters spread evenly. Why the
"recent" set: stats lag by a stats period, so the request right after a cold load would otherwise
not see the replica that is loading it.

A request without an adapter (the base model) gets one rank with every replica: load alone.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from enum import IntEnum
from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field

from openlora_ray.serve.state import ReplicaState

MASK64 = (1 << 64) - 1


class RouterSettings(BaseModel):
    """Router thresholds. JSON-serialisable: they travel in ``RequestRouterConfig.request_router_kwargs``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    spill_load: float = Field(
        1.0,
        gt=0,
        description="a holder whose load ((running + queued) / max_running) reached this stops being "
        "preferred over a non-holder: the adapter spills to one more replica. 1.0 = spill rather than "
        "queue behind a full decode batch; higher values trade queueing for fewer adapter copies "
        "(see BENCHMARKS.md, routing policy at scale)",
    )
    vram_bucket_mb: int = Field(
        1024, ge=1, description="free VRAM is compared in buckets of this size, so small differences tie"
    )
    load_bucket: float = Field(0.25, gt=0, description="load is compared in buckets of this width")
    recent_ttl_s: float = Field(
        4.0,
        ge=0,
        description="how long a replica this router sent an adapter to counts as loading it "
        "(about twice request_routing_stats_period_s)",
    )
    strict_ranks: int = Field(
        8,
        ge=1,
        description="non-holders given a strict order (one per rank); the rest share a rank, which "
        "bounds how many ranks Serve walks one by one when replicas are full",
    )


class Tier(IntEnum):
    """How close a replica is to serving an adapter; lower is better."""

    RESIDENT = 0
    LOADING = 1
    HOST = 2
    DISK = 3
    NONE = 4


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


_replica_hash = lru_cache(maxsize=16384)(stable_hash)


def mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection on 64-bit ints with full avalanche."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def hrw_score(adapter_hash: int, replica_hash: int) -> int:
    """Rendezvous (highest random weight) score of a replica for an adapter.

    For a fixed adapter the map replica -> score is a bijection of the replica's hash, so scores
    never tie, and the ordering of replicas is independent across adapters. Removing a replica
    only moves the adapters whose top choice it was. ``simulate`` computes the same in numpy.
    """
    return mix64(adapter_hash ^ replica_hash)


def holder_tier(adapter_id: str, state: ReplicaState, recent: Collection[str] = ()) -> Tier:
    """Where ``state`` has the adapter; ``recent`` are replicas this router just sent it to."""
    if adapter_id in state.resident:
        return Tier.RESIDENT
    if adapter_id in state.loading or state.replica_id in recent:
        return Tier.LOADING
    if adapter_id in state.host:
        return Tier.HOST
    if adapter_id in state.disk:
        return Tier.DISK
    return Tier.NONE


def replica_load(state: ReplicaState, queue_lens: Mapping[str, int] | None = None) -> float:
    """The replica's load: from the router's own queue-length figure when it has one, else from
    the stats. Serve keeps a per-router cache of each replica's ongoing requests (bumped on every
    send, corrected by every probe), which is fresher than stats reported a period ago."""
    queue_len = queue_lens.get(state.replica_id) if queue_lens else None
    return state.load if queue_len is None else queue_len / max(1, state.max_running)


def is_busy(load: float, settings: RouterSettings) -> bool:
    """Past the spill threshold: no longer preferred over a non-holder that is not."""
    return load >= settings.spill_load


def waits_for_slot(adapter_id: str, state: ReplicaState, in_flight: Collection[str]) -> bool:
    """Would a request for ``adapter_id`` wait for a slot on ``state``'s replica?

    ``in_flight``: the adapters of requests in flight there. Each pins its adapter's slot while it
    runs, so once they are ``num_slots`` distinct other adapters, ``adapter_id`` waits until one
    of them finishes. Then it cannot be in a slot either, whatever the (older) stats say: every
    slot holds one of the others. A replica that has not reported its slot count yet
    (``num_slots`` 0) is given the benefit of the doubt.
    """
    if state.num_slots == 0 or adapter_id in in_flight:
        return False
    return len(in_flight) >= state.num_slots


def placement_key(adapter_hash: int, state: ReplicaState, load: float, settings: RouterSettings) -> tuple[int, int, int]:
    """Order of non-holders for an adapter, largest first: free VRAM, then low load, then the hash.

    VRAM and load are bucketed so that near-equal replicas tie and the per-adapter hash decides:
    different adapters then spread over the many about-equal replicas instead of all going to
    the single emptiest one, and two routers whose figures differ by less than a bucket (their
    queue lengths differ by the requests each sent lately) still pick the same replica.
    """
    return (
        state.free_vram_mb // settings.vram_bucket_mb,
        -math.floor(load / settings.load_bucket),
        hrw_score(adapter_hash, _replica_hash(state.replica_id)),
    )


def rank_replicas(
    adapter_id: str | None,
    replicas: Sequence[ReplicaState],
    settings: RouterSettings,
    recent: Collection[str] = (),
    queue_lens: Mapping[str, int] | None = None,
    in_flight: Mapping[str, Collection[str]] | None = None,
) -> list[list[str]]:
    """Ranks of replica ids, best first, covering every replica exactly once (see module doc).

    ``adapter_id`` None or "" is the base model. ``recent``: replica ids this router sent
    ``adapter_id`` to within ``settings.recent_ttl_s`` (``RecentSends.replicas_for``); they count
    as loading it. ``queue_lens``: the router's fresher ongoing-request counts, where it has them
    (``replica_load``). ``in_flight``: replica id -> adapters of the requests in flight there
    (``InFlight.adapters``), for ``waits_for_slot``.
    """
    if not adapter_id:
        return [[r.replica_id for r in replicas]] if replicas else []
    holders: list[list[str]] = [[] for _ in range(Tier.NONE)]
    busy_holders: list[str] = []
    free: list[tuple[ReplicaState, float]] = []
    busy_free: list[str] = []
    for state in replicas:
        tier = holder_tier(adapter_id, state, recent)
        load = replica_load(state, queue_lens)
        busy = is_busy(load, settings) or (
            in_flight is not None and waits_for_slot(adapter_id, state, in_flight.get(state.replica_id, ()))
        )
        if tier is Tier.NONE:
            if busy:
                busy_free.append(state.replica_id)
            else:
                free.append((state, load))
        elif busy:
            busy_holders.append(state.replica_id)
        else:
            holders[tier].append(state.replica_id)

    ranks = [rank for rank in holders if rank]
    if free:
        adapter_hash = stable_hash(adapter_id)
        keyed = [(placement_key(adapter_hash, s, load, settings), s.replica_id) for s, load in free]
        strict = heapq.nlargest(settings.strict_ranks, keyed)
        ranks.extend([replica_id] for _, replica_id in strict)
        if len(keyed) > len(strict):
            chosen = {replica_id for _, replica_id in strict}
            ranks.append([replica_id for _, replica_id in keyed if replica_id not in chosen])
    for rank in (busy_holders, busy_free):
        if rank:
            ranks.append(rank)
    return ranks


class RecentSends:
    """Where this router sent each adapter lately: adapter -> {replica id: time sent}.

    The router's view of the replicas is a stats period old, so a replica that was just sent a
    cold adapter does not report it yet; ``rank_replicas`` treats the replicas returned by
    ``replicas_for`` as loading the adapter. Entries expire after ``ttl_s``; times are whatever
    clock the caller uses (the router passes ``time.monotonic()``, the simulator its own clock).
    """

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._sent: dict[str, dict[str, float]] = {}
        self._last_prune = -math.inf

    def __len__(self) -> int:
        return sum(len(v) for v in self._sent.values())

    def record(self, adapter_id: str, replica_id: str, now: float) -> None:
        self._sent.setdefault(adapter_id, {})[replica_id] = now
        if now - self._last_prune >= self.ttl_s:
            self.prune(now)

    def discard(self, adapter_id: str, replica_id: str, sent_at: float) -> None:
        """Withdraw the entry recorded at ``sent_at``; one refreshed since (a later send) stays."""
        sent = self._sent.get(adapter_id)
        if sent is not None and sent.get(replica_id) == sent_at:
            del sent[replica_id]
            if not sent:
                del self._sent[adapter_id]

    def replicas_for(self, adapter_id: str, now: float) -> frozenset[str]:
        sent = self._sent.get(adapter_id)
        if not sent:
            return frozenset()
        return frozenset(r for r, t in sent.items() if now - t < self.ttl_s)

    def prune(self, now: float) -> None:
        """Drop expired entries (``record`` calls this at most once per ``ttl_s``: memory stays bounded)."""
        self._last_prune = now
        for adapter_id in list(self._sent):
            live = {r: t for r, t in self._sent[adapter_id].items() if now - t < self.ttl_s}
            if live:
                self._sent[adapter_id] = live
            else:
                del self._sent[adapter_id]

    def forget_replicas(self, keep: Collection[str]) -> None:
        """Drop every entry for a replica not in ``keep`` (it died or was scaled away)."""
        for adapter_id in list(self._sent):
            live = {r: t for r, t in self._sent[adapter_id].items() if r in keep}
            if live:
                self._sent[adapter_id] = live
            else:
                del self._sent[adapter_id]


class InFlight:
    """The requests this router has in flight, by replica: which adapters are pinning slots there.

    The router records a request when Serve reports it routed and drops it when Serve reports it
    completed (Serve calls ``on_request_completed`` exactly once per dispatched request). Only
    requests naming an adapter are kept: the base model takes no slot.
    """

    def __init__(self) -> None:
        self._where: dict[str, tuple[str, str]] = {}  # request id -> (replica id, adapter id)
        self._adapters: dict[str, Counter[str]] = {}  # replica id -> adapter id -> requests

    def __len__(self) -> int:
        return len(self._where)

    def add(self, request_id: str, replica_id: str, adapter_id: str) -> None:
        self.remove(request_id)  # a retried request is counted where it went last
        self._where[request_id] = (replica_id, adapter_id)
        self._adapters.setdefault(replica_id, Counter())[adapter_id] += 1

    def remove(self, request_id: str) -> None:
        where = self._where.pop(request_id, None)
        if where is None:
            return
        replica_id, adapter_id = where
        counts = self._adapters[replica_id]
        counts[adapter_id] -= 1
        if counts[adapter_id] == 0:
            del counts[adapter_id]
            if not counts:
                del self._adapters[replica_id]

    def adapters(self) -> Mapping[str, Collection[str]]:
        """replica id -> the distinct adapters in flight there (a live view: do not keep it)."""
        return self._adapters

    def forget_replicas(self, keep: Collection[str]) -> None:
        """Drop the requests of replicas not in ``keep``: their slots went with them."""
        for request_id, (replica_id, _) in list(self._where.items()):
            if replica_id not in keep:
                self.remove(request_id)
