"""The adapter-affinity routing policy: pure functions from (adapter, replica states) to ranks.

Ray Serve's ``RequestRouter`` contract is "return ranks, best first; within a rank Serve picks the
replica with the shortest queue (from its own queue-length cache), and moves to the next rank when
every replica of a rank is at ``max_ongoing_requests``". The policy therefore encodes *preference*
in the rank order and leaves *least loaded among equals* to Serve. It has no Ray import so that it
is unit-tested and simulated at scale (``openlora_ray.serve.simulate``) without a cluster.

Order for a request naming an adapter (each non-empty group is one rank unless said otherwise):

1. replicas with the adapter in a device slot, not busy: the first ``holder_sample`` such found
   going through the slot holders (sorted by id) from a random start, ``RoutingInputs.draw``
   (Serve then takes the shortest queue among them: a power of k choices, and a decision over a
   hot adapter's hundred copies looks at a few);
2. then those loading it (reported, or sent it by this router within ``recent_ttl_s``),
   then those with it in host RAM, then on local disk; all not busy (of more than ``FAR_HOLDERS``
   host/disk holders, only those among the adapter's probes, see 3).
   Loading comes before host/disk because that replica has already spent a slot on the adapter:
   sending the request elsewhere would spend a second one. The slot holders not examined in 1
   share one rank between the loading ones and the host/disk ones (Serve reaches them when it
   finds every examined one full);
3. up to ``strict_ranks`` candidates (one when 1 or 2 has a replica: then they are only the
   fallback for when Serve finds those full), one per rank, in placement order: the first replicas the
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

import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from openlora_ray.serve.ring import probe_sequence, successor_by_scan
from openlora_ray.serve.router_memory import Popularity
from openlora_ray.serve.state import ReplicaState


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
        "placement order; every other replica shares one rank after them. When a holder can take the "
        "request, one candidate (the first in probe order) is the fallback",
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
    holder_sample: int = Field(
        8,
        ge=1,
        description="a decision examines an adapter's slot holders from a random start until it finds "
        "this many not busy; they make the first rank (Serve takes the shortest queue among them), the "
        "holders not examined share a later one. A hot adapter's hundred copies then cost a decision a "
        "few of them, not all (issue 16: at most 0.2 ms per decision at 1,000 replicas)",
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


def victim_heat(state: ReplicaState, popularity: Popularity | None, now: float, pinned: Collection[str]) -> int:
    """How hot the adapter is that loading one more on ``state`` would evict: -1 with a free slot
    (nothing is evicted), else the lowest heat among the slots that no request in flight pins.
    The replica evicts its least recently used unpinned slot, which on a replica serving a mix is
    mostly its coldest (the simulator, given each replica's exact LRU order instead, did no better)."""
    if state.free_slots > 0:
        return -1
    if popularity is None:
        return 0
    return popularity.coldest(state.resident.difference(pinned) if pinned else state.resident, now)


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


@dataclass(frozen=True)
class RoutingInputs:
    """What a router knows besides the replicas' stats, for one decision (see ``rank_replicas``)."""

    recent: Collection[str] = ()
    queue_lens: QueueLens | None = None
    in_flight: Mapping[str, Collection[str]] | None = None
    popularity: Popularity | None = None
    now: float = 0.0
    draw: int = 0  # a random number per decision: where the examination of the slot holders starts


NO_INPUTS = RoutingInputs()


def _load_unless_busy(adapter_id: str, state: ReplicaState, settings: RouterSettings, inputs: RoutingInputs) -> float:
    """``replica_load``, or -1 when the replica is busy for the request (``is_busy``,
    ``kv_exhausted`` or ``waits_for_slot``): those inlined, since a decision asks this of every
    replica it examines and the calls were a third of its time."""
    queue_len = inputs.queue_lens.get(state.replica_id) if inputs.queue_lens is not None else None
    load = (state.running + state.queued if queue_len is None else queue_len) / max(1, state.max_running)
    if load >= settings.spill_load:
        return -1.0
    if state.total_kv_blocks > 0 and state.free_kv_blocks / state.total_kv_blocks < settings.min_free_kv:
        return -1.0
    if inputs.in_flight is not None and state.num_slots:
        pinned = inputs.in_flight.get(state.replica_id, ())
        if adapter_id not in pinned and len(pinned) >= state.num_slots:
            return -1.0
    return load


def assemble_ranks(
    adapter_id: str,
    near: Sequence[str],
    far: Iterable[str],
    probes: Iterable[str],
    *,
    state_of: Callable[[str], ReplicaState | None],
    rest_of: Callable[[set[str]], list[str]],
    settings: RouterSettings,
    inputs: RoutingInputs,
) -> list[list[str]]:
    """The ranks from the slot holders (``near``: in a slot or loading, sorted), the host and disk
    holders (``far``) and the probe sequence; ``rest_of(placed)`` is every other replica, sorted.
    Shared by the O(replicas) reference and the index, which differ only in how they find these.

    Slot holders are examined from ``inputs.draw`` on (cyclically) until ``settings.holder_sample``
    of them are found not busy; those not examined share one rank after the examined ones."""
    by_tier: list[list[str]] = [[] for _ in range(Tier.NONE)]
    busy_holders: list[str] = []
    placed: set[str] = set()
    count = len(near)
    start = inputs.draw % count if count else 0
    idle = 0
    unexamined: list[str] = []
    for k in range(count):
        if idle == settings.holder_sample:
            unexamined = [near[(start + j) % count] for j in range(k, count)]
            placed.update(unexamined)
            break
        replica_id = near[(start + k) % count]
        placed.add(replica_id)
        state = state_of(replica_id)
        if state is None:
            continue
        if _load_unless_busy(adapter_id, state, settings, inputs) < 0:
            busy_holders.append(replica_id)
        else:
            by_tier[holder_tier(adapter_id, state, inputs.recent)].append(replica_id)
            idle += 1
    for replica_id in far:
        placed.add(replica_id)
        state = state_of(replica_id)
        if state is None:
            continue
        if _load_unless_busy(adapter_id, state, settings, inputs) < 0:
            busy_holders.append(replica_id)
        else:
            by_tier[holder_tier(adapter_id, state, inputs.recent)].append(replica_id)
    ranks = [sorted(rank) for rank in by_tier[: Tier.HOST] if rank]
    if unexamined:
        ranks.append(unexamined)
    ranks.extend(sorted(rank) for rank in by_tier[Tier.HOST :] if rank)
    # With a holder to take the request, the candidates are only the fallback for when Serve finds
    # every such holder full: the first one in probe order will do, and costs no placement keys.
    wanted = settings.strict_ranks if not ranks else 1
    keyed: list[tuple[tuple[int, ...], int, str]] = []
    for position, replica_id in enumerate(probes):
        state = state_of(replica_id)
        if replica_id in placed or state is None or holder_tier(adapter_id, state, inputs.recent) <= Tier.LOADING:
            continue
        load = _load_unless_busy(adapter_id, state, settings, inputs)
        if load < 0:
            continue
        if wanted == 1:
            keyed.append(((), -position, replica_id))
            break
        pinned = inputs.in_flight.get(replica_id, ()) if inputs.in_flight is not None else ()
        heat = victim_heat(state, inputs.popularity, inputs.now, pinned)
        keyed.append((placement_key(state, load, settings, heat), -position, replica_id))
        if len(keyed) == wanted:
            break
    keyed.sort(reverse=True)
    ranks.extend([replica_id] for _, _, replica_id in keyed)
    rest = rest_of(placed.union(replica_id for _, _, replica_id in keyed))
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
    near = sorted(r for r, tier in tiers.items() if tier <= Tier.LOADING)
    far = [r for r, tier in tiers.items() if Tier.LOADING < tier < Tier.NONE]

    def successor(point: int) -> str:
        return successor_by_scan(point, by_id)

    if len(far) > FAR_HOLDERS:
        probed = set(probe_sequence(adapter_id, settings.probe_points, successor))
        far = [r for r in far if r in probed]
    probes = probe_sequence(adapter_id, settings.probe_points, successor)
    ids = sorted(by_id)

    def rest_of(placed: set[str]) -> list[str]:
        return [r for r in ids if r not in placed]

    return assemble_ranks(
        adapter_id, near, far, probes, state_of=by_id.get, rest_of=rest_of, settings=settings, inputs=inputs
    )


