"""``LoraAffinityRouter``: the Ray Serve ``RequestRouter`` that runs ``routing.rank_replicas``.

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

``RequestRouterConfig`` cloudpickles this class by value; the module imports only Ray and this
package's ``serve.state``/``serve.routing`` (no torch), which are installed wherever Serve runs.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from openlora_ray.serve.routing import InFlight, RecentSends, RouterSettings, Tier, holder_tier, rank_replicas
from openlora_ray.serve.state import ReplicaState


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


class LoraAffinityRouter(RequestRouter):
    """Adapter affinity with spill, rendezvous tie-breaks and a local "recently sent" map."""

    # The clock of the recently-sent map; a class attribute so tests can substitute a fake one.
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def initialize_state(self, **kwargs: Any) -> None:
        """Called once by Serve with ``request_router_kwargs``: the fields of ``RouterSettings``."""
        self.settings = RouterSettings(**kwargs)
        self._recent = RecentSends(self.settings.recent_ttl_s)
        self._states: dict[str, _CachedState] = {}
        self._claims: OrderedDict[str, _Claim] = OrderedDict()  # internal request id -> claim, oldest first
        self._in_flight = InFlight()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        adapter_id = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if pending_request is not None:
            # Without this, Serve re-calls choose_replicas in a tight loop when every rank is full.
            pending_request.routing_context.should_backoff = True
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        states = [self._state_of(r) for r in candidate_replicas]
        if adapter_id:
            now = self.clock()
            recent = self._recent.replicas_for(adapter_id, now)
            ranks = rank_replicas(
                adapter_id, states, self.settings, recent, self._queue_lens(candidate_replicas), self._in_flight.adapters()
            )
            if ranks and len(ranks[0]) == 1:
                first = next(s for s in states if s.replica_id == ranks[0][0])
                if holder_tier(adapter_id, first, recent) is Tier.NONE:
                    self._claim(pending_request.metadata.internal_request_id, _Claim(adapter_id, first.replica_id, now))
        else:
            ranks = rank_replicas(None, states, self.settings)
        return [[by_id[replica_id] for replica_id in rank] for rank in ranks]

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

    def _queue_lens(self, replicas: list[RunningReplica]) -> dict[str, int]:
        """Serve's per-router queue lengths (ongoing requests), where fresh: bumped on every send
        and corrected by every probe, so a fresher load figure than the replica's last stats."""
        cache = self.replica_queue_len_cache
        return {r.replica_id.unique_id: q for r in replicas if (q := cache.get(r.replica_id)) is not None}

    def _state_of(self, replica: RunningReplica) -> ReplicaState:
        """The replica's ``ReplicaState``, re-parsed only when Serve handed us new stats.

        Serve replaces both the stats dict and the model-id set when a replica's info changes, so
        an identity check avoids rebuilding thousands of frozensets on every request. Model ids
        that Serve's multiplexing reports and the stats do not show in a slot read as loading:
        they are the fresher signal (pushed within ~0.1 s of a load starting).
        """
        replica_id = replica.replica_id.unique_id
        stats, model_ids = replica.routing_stats, replica.multiplexed_model_ids
        cached = self._states.get(replica_id)
        if cached is not None and cached.stats is stats and cached.model_ids is model_ids:
            return cached.state
        state = ReplicaState.from_stats(replica_id, stats)
        extra = frozenset(model_ids) - state.resident - state.loading
        if extra:
            state = dataclasses.replace(state, loading=state.loading | extra)
        self._states[replica_id] = _CachedState(stats, model_ids, state)
        return state
