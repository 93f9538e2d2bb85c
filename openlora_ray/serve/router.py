"""``LoraAffinityRouter``: the Ray Serve ``RequestRouter`` that runs ``routing_index.RoutingIndex.rank``.

Configure it on the replica deployment::

    RequestRouterConfig(
        request_router_class="openlora_ray.serve.router:LoraAffinityRouter",
        request_router_kwargs=RouterSettings(...).model_dump(),
        request_routing_stats_period_s=2,
    )

It runs inside every caller that holds a handle to the deployment (each ingress replica), each with
its own view: the replicas' ``record_routing_stats`` dicts (``ReplicaState.to_stats``) as last
broadcast by the controller, plus Serve's multiplexed model ids when the replica uses
``@serve.multiplexed`` (pushed within ~0.1 s of a load starting, so fresher than the stats), plus
where this router itself sent each adapter within ``recent_ttl_s``, plus Serve's own per-router
queue lengths as the load figure where it has them (the stats' load otherwise).

A cold placement is claimed when it is ranked, not when Serve reports it routed: Serve bumps its
queue-length cache as it sends, but calls ``on_request_routed`` only after the replica's accept
comes back, a round trip later. A second request for the same cold adapter ranked in that window
would see the chosen replica one request busier than the others and, with nothing yet saying it
holds the adapter, go elsewhere, loading the adapter twice. The claim makes it count as loading
from the start; if Serve ends up sending the request elsewhere (the first choice was full), the
claim is withdrawn when the request is routed.

Which slots a replica has in use comes from this router's own requests in flight (recorded when
Serve reports a request routed, dropped when it reports it completed): a replica whose slots are
all held by adapters of running requests ranks as busy for any other adapter (``waits_for_slot``).

The replicas' states live in a ``RoutingIndex`` (adapter -> holders, a ring for the probes), so a
decision touches the adapter's holders and a few probed replicas rather than every replica. The
index is refreshed from Serve's replica objects at most every ``REFRESH_S`` (checking each
replica's stats dict and model-id set by identity is itself a pass over every replica); stats
change every stats period and model ids within ~0.1 s, so the delay this adds is small.

``RequestRouterConfig`` cloudpickles this class by value; the module imports only Ray and this
package's policy modules (``serve.state``, ``routing``, ``routing_index``, ``ring``,
``router_memory``; no torch), which are installed wherever Serve runs.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from openlora_ray.serve.router_memory import InFlight, Popularity, RecentSends
from openlora_ray.serve.routing import RouterSettings, RoutingInputs, Tier, holder_tier
from openlora_ray.serve.routing_index import RoutingIndex
from openlora_ray.serve.state import ReplicaState

REFRESH_S = 0.05  # how often the index re-reads the replicas' stats and model ids


@dataclasses.dataclass(frozen=True)
class _CachedState:
    """A replica's parsed state and the objects it was parsed from (compared by identity)."""

    stats: dict[str, Any]
    model_ids: frozenset[str] | set[str]
    state: ReplicaState


@dataclasses.dataclass(frozen=True)
class _Claim:
    """A cold placement this router ranked first for a request that has not been routed yet."""

    adapter_id: str
    replica_id: str
    at: float


class _QueueLens:
    """Serve's per-router queue-length cache, read by replica id string as ``routing`` wants it,
    for the replicas this router sent to within ``trust_s`` (``RouterSettings.queue_len_trust_s``:
    the cache never sees other routers' completions, so it drifts)."""

    def __init__(self, cache: Any, replica_ids: Mapping[str, ReplicaID], sent_at: Mapping[str, float], since: float) -> None:
        self.cache, self.replica_ids, self.sent_at, self.since = cache, replica_ids, sent_at, since

    def get(self, replica_id: str, /) -> int | None:
        rid = self.replica_ids.get(replica_id)
        if rid is None or self.sent_at.get(replica_id, -float("inf")) < self.since:
            return None
        return self.cache.get(rid)


class LoraAffinityRouter(RequestRouter):
    """Adapter affinity with spill, probe-order tie-breaks and a local "recently sent" map."""

    # The clock of the recently-sent map; a class attribute so tests can substitute a fake one.
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def initialize_state(self, **kwargs: Any) -> None:
        """Called once by Serve with ``request_router_kwargs``: the fields of ``RouterSettings``."""
        self.settings = RouterSettings(**kwargs)
        self._recent = RecentSends(self.settings.recent_ttl_s)
        self._popularity = Popularity(self.settings.popularity_half_life_s)
        self._index = RoutingIndex()
        self._states: dict[str, _CachedState] = {}
        self._by_id: dict[str, RunningReplica] = {}
        self._replica_ids: dict[str, ReplicaID] = {}
        self._sent_at: dict[str, float] = {}  # replica id -> this router's last send there
        self._refreshed_at = -float("inf")
        self._claims: OrderedDict[str, _Claim] = OrderedDict()  # internal request id -> claim, oldest first
        self._in_flight = InFlight()
        self._rng = random.Random()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        adapter_id = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if pending_request is not None:
            # Without this, Serve re-calls choose_replicas in a tight loop when every rank is full.
            pending_request.routing_context.should_backoff = True
        now = self.clock()
        self._refresh(candidate_replicas, now)
        if adapter_id:
            self._popularity.record(adapter_id, now)
            inputs = RoutingInputs(
                recent=self._recent.replicas_for(adapter_id, now),
                queue_lens=_QueueLens(
                    self.replica_queue_len_cache, self._replica_ids, self._sent_at, now - self.settings.queue_len_trust_s
                ),
                in_flight=self._in_flight.adapters(),
                popularity=self._popularity,
                now=now,
                draw=self._rng.getrandbits(32),
            )
            ranks = self._index.rank(adapter_id, self.settings, inputs)
            if ranks and len(ranks[0]) == 1:
                first = self._index.state(ranks[0][0])
                if first is not None and holder_tier(adapter_id, first, inputs.recent) is Tier.NONE:
                    self._claim(pending_request.metadata.internal_request_id, _Claim(adapter_id, first.replica_id, now))
        else:
            ranks = self._index.rank(None, self.settings)
        by_id = self._by_id
        return [[by_id[replica_id] for replica_id in rank if replica_id in by_id] for rank in ranks]

    def _refresh(self, replicas: list[RunningReplica], now: float) -> None:
        """Re-read the replicas' states into the index when ``REFRESH_S`` has passed or the set of
        replicas changed (see the module doc)."""
        if now - self._refreshed_at < REFRESH_S and len(replicas) == len(self._by_id):
            return
        self._refreshed_at = now
        by_id = {r.replica_id.unique_id: r for r in replicas}
        if by_id.keys() != self._by_id.keys():
            self._index.set_replicas(by_id.keys())
        self._by_id = by_id
        self._replica_ids = {k: r.replica_id for k, r in by_id.items()}
        for replica in replicas:
            self._update_index(replica)

    def _claim(self, request_id: str, claim: _Claim) -> None:
        """Count ``claim.replica_id`` as loading the adapter now (see the module doc)."""
        self._recent.record(claim.adapter_id, claim.replica_id, claim.at)
        self._claims[request_id] = claim
        self._claims.move_to_end(request_id)
        # Requests cancelled before routing never come back: drop claims past the TTL.
        while self._claims:
            oldest = next(iter(self._claims.values()))
            if claim.at - oldest.at < self.settings.recent_ttl_s:
                break
            self._claims.popitem(last=False)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        adapter_id = pending_request.metadata.multiplexed_model_id
        claim = self._claims.pop(pending_request.metadata.internal_request_id, None)
        if claim is not None and claim.replica_id != replica_id.unique_id:
            self._recent.discard(claim.adapter_id, claim.replica_id, claim.at)
        if adapter_id:
            self._recent.record(adapter_id, replica_id.unique_id, self.clock())
            self._in_flight.add(pending_request.metadata.internal_request_id, replica_id.unique_id, adapter_id)

    def on_send_request(self, replica_id: ReplicaID) -> None:
        """Serve bumps its queue-length cache as it sends: the entry is one this router can trust."""
        super().on_send_request(replica_id)
        self._sent_at[replica_id.unique_id] = self.clock()

    def on_new_queue_len_info(self, replica_id: ReplicaID, num_ongoing_requests: int) -> None:
        """The replica's own count (in its answer to a send): the entry is exact again."""
        super().on_new_queue_len_info(replica_id, num_ongoing_requests)
        self._sent_at[replica_id.unique_id] = self.clock()

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        self._in_flight.remove(internal_request_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._keep_only({r.unique_id for r in self.curr_replicas})

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._keep_only({r.replica_id.unique_id for r in replicas})

    def _keep_only(self, live: set[str]) -> None:
        for replica_id in [r for r in self._states if r not in live]:
            del self._states[replica_id]
        self._recent.forget_replicas(live)
        self._in_flight.forget_replicas(live)
        self._sent_at = {r: t for r, t in self._sent_at.items() if r in live}
        self._refreshed_at = -float("inf")  # membership changed: re-read on the next decision

    def _update_index(self, replica: RunningReplica) -> None:
        """Put the replica's ``ReplicaState`` in the index, re-parsed only when Serve handed us new stats.

        Serve replaces both the stats dict and the model-id set when a replica's info changes, so
        an identity check avoids rebuilding thousands of frozensets on every request. Model ids
        that Serve's multiplexing reports and the stats do not show in a slot read as loading:
        they are the fresher signal (pushed within ~0.1 s of a load starting).
        """
        replica_id = replica.replica_id.unique_id
        stats, model_ids = replica.routing_stats, replica.multiplexed_model_ids
        cached = self._states.get(replica_id)
        if cached is not None and cached.stats is stats and cached.model_ids is model_ids:
            return
        state = ReplicaState.from_stats(replica_id, stats)
        extra = frozenset(model_ids) - state.resident - state.loading
        if extra:
            state = dataclasses.replace(state, loading=state.loading | extra)
        self._states[replica_id] = _CachedState(stats, model_ids, state)
        self._index.update(state)
