"""The adapter-affinity routing policy: pure functions from (adapter, replica states) to ranks.

Ray Serve's ``RequestRouter`` contract is "return ranks, best first; within a rank Serve picks the
replica with the shortest queue (from its own queue-length cache), and moves to the next rank when
every replica of a rank is at ``max_ongoing_requests``". The policy therefore encodes *preference*
in the rank order and leaves *least loaded among equals* to Serve. It has no Ray import so that it
is unit-tested and simulated at scale (``openlora_ray.serve.simulate``) without a cluster.

Order for a request naming an adapter (each non-empty group is one rank unless said otherwise):

1. replicas with the adapter in a device slot, not busy;
2. then those loading it (reported, or sent it by this router within ``recent_ttl_s``),
   then those with it in host RAM, then on local disk; all not busy (of more than ``FAR_HOLDERS``
   host/disk holders, only those among the adapter's probes, see 3).
   Loading comes before host/disk because that replica has already spent a slot on the adapter:
   sending the request elsewhere would spend a second one;
3. up to ``strict_ranks`` candidates, one per rank, in placement order: the first replicas the
   adapter's probes land on (``probe_sequence``: a consistent-hash ring, the same sequence in
   every router) that neither hold it nor are busy. Placement order (``placement_key``): the
   coldest eviction first (a free slot best; else the replica whose coldest slot was asked for
   least lately, by this router's ``Popularity``), then the most free KV cache (free memory
   where KV blocks are not reported), then the lowest load, then probe order. This is where a
   cold adapter lands and where a hot one *spills* once every holder is busy; the spill target
   then reports the adapter and becomes a holder, so an adapter's replica set grows with its
   load, and shrinks as replicas evict copies that went cold;
4. every other replica, one rank (Serve takes the shortest queue in it): the catch-all when every
   holder and candidate is busy;
5. busy holders (one rank), last: a request there waits behind a full batch.

A replica is *busy* for a request when its load reached ``spill_load``, when it reports less free
KV cache than ``min_free_kv``, or when the request would wait for a slot there
(``waits_for_slot``): every slot is held by another adapter that requests in flight are using.
Such a request cannot start until one of those requests finishes, which costs a whole
generation; loading the adapter on a replica with an idle slot costs a copy from host RAM, disk
or the store. The slots in use come from the requests this router has in flight (``InFlight``:
exact with one ingress replica, a lower bound with several), not from the stats, which lag by a
period while requests last about as long.

Residency and free capacity come from the replicas' stats (a stats period old). Load comes from
the router's own queue length for a replica it sent to within ``queue_len_trust_s`` (Serve's
per-router cache: bumped on this router's sends, reset to the replica's count when one is
accepted), else from the stats. Fresh, the cache sees a burst this router just sent that the
stats cannot; older, it drifts, because it never sees other routers' completions: with four
ingress routers, two thirds of the requests that left an adapter's holders because the cache
showed them busy found a holder with a free batch row in truth (``simulate``).

Why probes: a decision must not scan every replica (``RoutingIndex`` finds the holders in an
adapter -> replicas map and the candidates by bisection on the ring, so it touches the holders
and a few probed replicas; ``rank_replicas`` is the O(replicas) reference it is tested against).
And ingress replicas route independently: capacity and load are bucketed so that near-equal
replicas tie and probe order decides, so routers with about the same view send concurrent cold
requests for one adapter to the same replica while different adapters spread evenly. Why
eviction heat: each replica evicts its least recently used slot, which keeps an adapter asked for
every few minutes only if it happens to be used before 16 misses pass through its replica;
placing each cold load where the slot it evicts is coldest keeps the adapters that are asked for
again and lets one-off adapters replace one another. Why the "recent" set: stats lag by a stats
period, so the request right after a cold load would otherwise not see the replica loading it.

A request without an adapter (the base model) gets one rank with every replica: load alone.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from typing import Protocol

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
        description="non-holder candidates for a cold or spilled adapter, each a rank of its own in "
        "placement order; every other replica shares one rank after them",
    )
    probe_points: int = Field(
        24,
        ge=1,
        description="probes on the replica ring per decision: candidates are the first strict_ranks "
        "replicas they land on that neither hold the adapter nor are busy",
    )
    min_free_kv: float = Field(
        0.02,
        ge=0,
        le=1,
        description="a replica reporting less free KV cache than this fraction is busy (new requests "
        "would queue for cache blocks); ignored for replicas that do not report KV blocks",
    )
    queue_len_trust_s: float = Field(
        1.0,
        ge=0,
        description="Serve's per-router queue length of a replica is the load figure only within this "
        "long of this router's last send there; older, the stats' figure is (see replica_load)",
    )
    popularity_half_life_s: float = Field(
        600.0,
        gt=0,
        description="request counts per adapter halve this often; they say how hot the slot a cold "
        "placement would evict is",
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


class QueueLens(Protocol):
    """The router's queue lengths it trusts, by replica id (a dict will do); lookups only, since a
    decision reads the replicas it ranks, not all of them."""

    def get(self, replica_id: str, /) -> int | None: ...


def replica_load(state: ReplicaState, queue_lens: QueueLens | None = None) -> float:
    """The replica's load: from the router's own queue-length figure when it has one it can
    trust (``queue_lens``, see ``RouterSettings.queue_len_trust_s``), else from the stats."""
    queue_len = queue_lens.get(state.replica_id) if queue_lens is not None else None
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


# Host-RAM and disk holders of an adapter are all ranked while they are this few; past that (a hot
# adapter sits in the host tier of most replicas) only those among its probes are, so a decision
# never walks every replica.
FAR_HOLDERS = 16
PROBE_STEP = 0x9E3779B97F4A7C15  # odd: probe points of one adapter never repeat within 2**64 steps
VNODE_STEP = 0xD6E8FEB86659FD93
VNODES = 32  # ring points per replica: shares of the probe points within about 1 / sqrt(32) of 1 / n


def capacity_bucket(state: ReplicaState, settings: RouterSettings) -> int:
    """Free capacity for more requests, bucketed: free KV blocks where the engine reports them, on
    a log scale (one bucket per factor of sqrt(2)), else free device memory in ``vram_bucket_mb``
    steps (see ``serve.state``). Absolute, not a fraction of the replica's cache: an idle replica
    on a GPU with three times the memory has three times the room, and ranks first; the log scale
    keeps a few blocks' difference from reordering replicas of one size."""
    if state.total_kv_blocks == 0:
        return state.free_vram_mb // settings.vram_bucket_mb
    return math.floor(2 * math.log2(state.free_kv_blocks + 1))


def kv_exhausted(state: ReplicaState, settings: RouterSettings) -> bool:
    """The replica reported less free KV cache than ``settings.min_free_kv``: new requests would queue."""
    fraction = state.free_kv_fraction
    return fraction is not None and fraction < settings.min_free_kv


class Popularity:
    """This router's request counts per adapter, halving every ``half_life_s``.

    It says how much a slot is worth: cold placement prefers the replica whose eviction candidate
    is coldest (``victim_heat``). Counts are bucketed on a log scale (``heat``) so that routers,
    each seeing its own share of the traffic, still agree on the order of replicas. Entries whose
    count decayed below ``FORGET`` are dropped once per half-life, so memory follows the adapters
    requested lately, not every adapter ever seen.

    Each count is stored scaled by ``2 ** ((t - base) / half_life_s)`` (``t`` when it was last
    incremented): comparing two adapters' counts is then comparing two stored numbers, with no
    decay to compute, which keeps ``victim_heat`` to a dictionary lookup per slot. ``base`` moves
    up at every prune, so the scale stays bounded.
    """

    FORGET = 0.05
    UNIT = 0.25  # heat 1 starts at this count: a quarter of a request (an adapter asked for every
    # two half-lives or so) is still told apart from one never asked for

    def __init__(self, half_life_s: float) -> None:
        self.half_life_s = half_life_s
        self._scaled: dict[str, float] = {}
        self._base = 0.0
        self._last_prune = -math.inf

    def __len__(self) -> int:
        return len(self._scaled)

    def _scale(self, now: float) -> float:
        return 2.0 ** ((now - self._base) / self.half_life_s)

    def count(self, adapter_id: str, now: float) -> float:
        return self._scaled.get(adapter_id, 0.0) / self._scale(now)

    def heat(self, adapter_id: str, now: float) -> int:
        """0 for an adapter not requested lately, then one more per doubling of its count past ``UNIT``."""
        return self._heat_of(self._scaled.get(adapter_id, 0.0), now)

    def _heat_of(self, scaled: float, now: float) -> int:
        count = scaled / (self._scale(now) * self.UNIT)
        return 0 if count < 1.0 else 1 + int(math.log2(count))

    def coldest(self, adapter_ids: Iterable[str], now: float) -> int:
        """The heat of the coldest of ``adapter_ids`` (0 when there are none)."""
        scaled = self._scaled
        return self._heat_of(min((scaled.get(a, 0.0) for a in adapter_ids), default=0.0), now)

    def record(self, adapter_id: str, now: float) -> None:
        if now - self._last_prune >= self.half_life_s:
            self._prune(now)
        self._scaled[adapter_id] = self._scaled.get(adapter_id, 0.0) + self._scale(now)

    def _prune(self, now: float) -> None:
        """Rebase the scale to ``now`` and drop the counts that decayed below ``FORGET``."""
        factor = 1.0 / self._scale(now)
        self._scaled = {a: v * factor for a, v in self._scaled.items() if v * factor >= self.FORGET}
        self._base, self._last_prune = now, now


def victim_heat(state: ReplicaState, popularity: Popularity | None, now: float, pinned: Collection[str]) -> int:
    """How hot the adapter is that loading one more on ``state`` would evict: -1 with a free slot
    (nothing is evicted), else the lowest heat among the slots that no request in flight pins.
    The replica evicts its least recently used unpinned slot, which on a replica serving a mix is
    mostly its coldest (the simulator, given each replica's exact LRU order instead, did no better)."""
    if state.free_slots > 0:
        return -1
    if popularity is None:
        return 0
    return popularity.coldest((a for a in state.resident if a not in pinned) if pinned else state.resident, now)


def placement_key(
    state: ReplicaState,
    load: float,
    settings: RouterSettings,
    heat: int,
) -> tuple[int, ...]:
    """Order of non-holder candidates for an adapter, largest first: coldest eviction (a free slot
    best), then most free KV capacity, then lowest load. Capacity and load are bucketed so that
    near-equal replicas tie, and the tie goes to the candidate earlier in the adapter's probe order:
    two routers whose figures differ by less than a bucket still pick the same replica."""
    return (-heat, capacity_bucket(state, settings), -math.floor(load / settings.load_bucket))


@lru_cache(maxsize=16384)
def vnode_keys(replica_id: str) -> tuple[int, ...]:
    h = _replica_hash(replica_id)
    return tuple(mix64((h + v * VNODE_STEP) & MASK64) for v in range(VNODES))


class ReplicaRing:
    """A consistent-hash ring of the replicas (``VNODES`` points each).

    An adapter's candidate replicas are the ring successors of its probe points, in probe order:
    a pseudo-random sequence that every router computes alike, that differs from adapter to
    adapter (so cold adapters spread evenly), and that moves only the probes landing on a replica
    that joins or leaves. ``successor`` is a bisection; ``successor_by_scan`` is the O(replicas)
    definition it must equal.
    """

    def __init__(self, replica_ids: Collection[str]) -> None:
        points = sorted((k, r) for r in replica_ids for k in vnode_keys(r))
        self.keys = [k for k, _ in points]
        self.ids = [r for _, r in points]

    def successor(self, point: int) -> str:
        i = bisect.bisect_left(self.keys, point)
        return self.ids[i if i < len(self.ids) else 0]


def successor_by_scan(point: int, replica_ids: Collection[str]) -> str:
    """The replica owning the first ring point at or after ``point`` (wrapping), by scanning all."""
    return min(((k - point) & MASK64, k, r) for r in replica_ids for k in vnode_keys(r))[2]


def probe_sequence(adapter_id: str, settings: RouterSettings, successor: Callable[[int], str]) -> Iterator[str]:
    """The adapter's distinct candidate replicas in probe order (at most ``settings.probe_points``
    probes; lazily, since a decision usually stops after the first few)."""
    seen: set[str] = set()
    adapter_hash = stable_hash(adapter_id)
    for j in range(settings.probe_points):
        replica_id = successor(mix64((adapter_hash + j * PROBE_STEP) & MASK64))
        if replica_id not in seen:
            seen.add(replica_id)
            yield replica_id


@dataclass(frozen=True)
class RoutingInputs:
    """What a router knows besides the replicas' stats, for one decision (see ``rank_replicas``)."""

    recent: Collection[str] = ()
    queue_lens: QueueLens | None = None
    in_flight: Mapping[str, Collection[str]] | None = None
    popularity: Popularity | None = None
    now: float = 0.0


NO_INPUTS = RoutingInputs()


def _is_busy_for(adapter_id: str, state: ReplicaState, load: float, settings: RouterSettings, inputs: RoutingInputs) -> bool:
    if is_busy(load, settings) or kv_exhausted(state, settings):
        return True
    return inputs.in_flight is not None and waits_for_slot(adapter_id, state, inputs.in_flight.get(state.replica_id, ()))


def _assemble(
    adapter_id: str,
    holders: Iterable[ReplicaState],
    probes: Iterable[str],
    state_of: Callable[[str], ReplicaState | None],
    all_ids: Iterable[str],
    settings: RouterSettings,
    inputs: RoutingInputs,
) -> list[list[str]]:
    """The ranks from the holders and the probe sequence; shared by the O(replicas) reference and
    the index, which differ only in how they find those two."""
    by_tier: list[list[str]] = [[] for _ in range(Tier.NONE)]
    busy_holders: list[str] = []
    held: set[str] = set()
    for state in holders:
        held.add(state.replica_id)
        tier = holder_tier(adapter_id, state, inputs.recent)
        load = replica_load(state, inputs.queue_lens)
        if _is_busy_for(adapter_id, state, load, settings, inputs):
            busy_holders.append(state.replica_id)
        else:
            by_tier[tier].append(state.replica_id)
    ranks = [sorted(rank) for rank in by_tier if rank]
    keyed: list[tuple[tuple[int, ...], int, str]] = []
    for position, replica_id in enumerate(probes):
        state = state_of(replica_id)
        if replica_id in held or state is None:
            continue
        load = replica_load(state, inputs.queue_lens)
        if _is_busy_for(adapter_id, state, load, settings, inputs):
            continue
        pinned = inputs.in_flight.get(replica_id, ()) if inputs.in_flight is not None else ()
        heat = victim_heat(state, inputs.popularity, inputs.now, pinned)
        keyed.append((placement_key(state, load, settings, heat), -position, replica_id))
        if len(keyed) == settings.strict_ranks:
            break
    keyed.sort(reverse=True)
    ranks.extend([replica_id] for _, _, replica_id in keyed)
    placed = held.union(replica_id for _, _, replica_id in keyed)
    rest = [replica_id for replica_id in all_ids if replica_id not in placed]
    for rank in (rest, sorted(busy_holders)):
        if rank:
            ranks.append(rank)
    return ranks


def rank_replicas(
    adapter_id: str | None,
    replicas: Sequence[ReplicaState],
    settings: RouterSettings,
    inputs: RoutingInputs = NO_INPUTS,
) -> list[list[str]]:
    """Ranks of replica ids, best first, covering every replica exactly once (see module doc).

    The O(replicas) reference: it scans every replica for holders and for the probe sequence.
    ``RoutingIndex.rank`` gives the same ranks touching only the holders and the probed replicas;
    a property test holds them equal.
    """
    if not adapter_id:
        return [[r.replica_id for r in replicas]] if replicas else []
    by_id = {r.replica_id: r for r in replicas}
    tiers = {r.replica_id: holder_tier(adapter_id, r, inputs.recent) for r in replicas}
    near = [r for r in replicas if tiers[r.replica_id] <= Tier.LOADING]
    far = [r for r in replicas if Tier.LOADING < tiers[r.replica_id] < Tier.NONE]

    def successor(point: int) -> str:
        return successor_by_scan(point, by_id)

    if len(far) > FAR_HOLDERS:
        probed = set(probe_sequence(adapter_id, settings, successor))
        far = [r for r in far if r.replica_id in probed]
    probes = probe_sequence(adapter_id, settings, successor)
    return _assemble(adapter_id, near + far, probes, by_id.get, sorted(by_id), settings, inputs)


def _move_between(holders: dict[str, set[str]], replica_id: str, before: frozenset[str], after: frozenset[str]) -> None:
    for adapter_id in before - after:
        replicas = holders[adapter_id]
        replicas.discard(replica_id)
        if not replicas:
            del holders[adapter_id]
    for adapter_id in after - before:
        holders.setdefault(adapter_id, set()).add(replica_id)


class RoutingIndex:
    """The replicas' states indexed by adapter, for decisions that do not scan every replica.

    ``update`` takes a replica's new state and moves it in the adapter -> holders maps (slot or
    loading; host RAM or disk); ``set_replicas`` fixes the membership and rebuilds the ring.
    ``rank`` then touches the adapter's slot holders, at most ``FAR_HOLDERS`` host/disk holders or
    those among its probes, the replicas its probes land on, and one pass over the ids for the
    catch-all rank.
    """

    def __init__(self) -> None:
        self._states: dict[str, ReplicaState] = {}
        self._near: dict[str, set[str]] = {}  # adapter -> replicas with it in a slot or loading it
        self._far: dict[str, set[str]] = {}  # adapter -> replicas with it in host RAM or on disk
        self._ring = ReplicaRing(())
        self._ids: list[str] = []

    def __len__(self) -> int:
        return len(self._states)

    def state(self, replica_id: str) -> ReplicaState | None:
        return self._states.get(replica_id)

    def set_replicas(self, replica_ids: Collection[str]) -> None:
        """Membership: new ids start as never reported, missing ones are dropped."""
        live = set(replica_ids)
        for replica_id in [r for r in self._states if r not in live]:
            self._move(self._states.pop(replica_id), ReplicaState(replica_id))
        for replica_id in live - self._states.keys():
            self._states[replica_id] = ReplicaState(replica_id)
        if set(self._ids) != live:
            self._ids = sorted(live)
            self._ring = ReplicaRing(live)

    def update(self, state: ReplicaState) -> None:
        """A replica's new state (a replica not in the membership is added, without a ring rebuild
        until ``set_replicas``: call that when membership changes)."""
        old = self._states.get(state.replica_id, ReplicaState(state.replica_id))
        self._states[state.replica_id] = state
        self._move(old, state)

    def _move(self, old: ReplicaState, new: ReplicaState) -> None:
        _move_between(self._near, old.replica_id, old.resident | old.loading, new.resident | new.loading)
        _move_between(self._far, old.replica_id, old.host | old.disk, new.host | new.disk)

    def holders(self, adapter_id: str) -> frozenset[str]:
        """Replicas with the adapter in any tier."""
        return frozenset(self._near.get(adapter_id, ())) | self._far.get(adapter_id, set())

    def rank(self, adapter_id: str | None, settings: RouterSettings, inputs: RoutingInputs = NO_INPUTS) -> list[list[str]]:
        """``rank_replicas`` over the indexed states (same ranks, same order within them)."""
        if not adapter_id:
            return [list(self._ids)] if self._ids else []
        states = self._states
        near = self._near.get(adapter_id, set()).union(r for r in inputs.recent if r in states)
        far = self._far.get(adapter_id, set()) - near
        if len(far) > FAR_HOLDERS:
            far = far.intersection(probe_sequence(adapter_id, settings, self._ring.successor))
        probes = probe_sequence(adapter_id, settings, self._ring.successor) if self._ids else iter(())
        return _assemble(adapter_id, [states[r] for r in near | far], probes, states.get, self._ids, settings, inputs)


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
