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

``RequestRouterConfig`` cloudpickles this class by value; the module imports only Ray and this
package's ``serve.state``/``serve.routing`` (no torch), which are installed wherever Serve runs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from openlora_ray.serve.routing import RecentSends, RouterSettings, rank_replicas
from openlora_ray.serve.state import ReplicaState


@dataclasses.dataclass(frozen=True)
class _CachedState:
    """A replica's parsed state and the objects it was parsed from (compared by identity)."""

    stats: dict[str, Any]
    model_ids: frozenset[str] | set[str]
    state: ReplicaState


class LoraAffinityRouter(RequestRouter):
    """Adapter affinity with spill, rendezvous tie-breaks and a local "recently sent" map."""

    # The clock of the recently-sent map; a class attribute so tests can substitute a fake one.
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def initialize_state(self, **kwargs: Any) -> None:
        """Called once by Serve with ``request_router_kwargs``: the fields of ``RouterSettings``."""
        self.settings = RouterSettings(**kwargs)
        self._recent = RecentSends(self.settings.recent_ttl_s)
        self._states: dict[str, _CachedState] = {}

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
            recent = self._recent.replicas_for(adapter_id, self.clock())
            ranks = rank_replicas(adapter_id, states, self.settings, recent, self._queue_lens(candidate_replicas))
        else:
            ranks = rank_replicas(None, states, self.settings)
        return [[by_id[replica_id] for replica_id in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        adapter_id = pending_request.metadata.multiplexed_model_id
        if adapter_id:
            self._recent.record(adapter_id, replica_id.unique_id, self.clock())

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
