"""``RoutingIndex``: the replicas' states indexed by adapter, so a routing decision touches an
adapter's holders and a few probed replicas instead of every replica.

It computes exactly what ``routing.rank_replicas`` (the O(replicas) reference) computes; a property
test holds the two equal rank for rank on random histories of reports and membership changes.
Pure Python, no Ray: the Serve router (``serve.router``) and the simulator (``serve.simulate``) both
call it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Collection
from itertools import repeat

from openlora_ray.serve.ring import ReplicaRing, probe_sequence
from openlora_ray.serve.routing import FAR_HOLDERS, NO_INPUTS, RouterSettings, RoutingInputs, assemble_ranks
from openlora_ray.serve.state import ReplicaState

CACHED_ADAPTERS = 65536  # adapters whose sorted holders and probe sequence are kept (then all are dropped)


def _move_between(
    holders: dict[str, set[str]], replica_id: str, before: frozenset[str], after: frozenset[str]
) -> frozenset[str]:
    """Move ``replica_id`` from the holders of ``before - after`` to those of ``after - before``;
    returns the adapters whose holders changed."""
    for adapter_id in before - after:
        replicas = holders[adapter_id]
        replicas.discard(replica_id)
        if not replicas:
            del holders[adapter_id]
    for adapter_id in after - before:
        holders.setdefault(adapter_id, set()).add(replica_id)
    return before ^ after


class RoutingIndex:
    """The replicas' states indexed by adapter, for decisions that do not scan every replica.

    ``update`` takes a replica's new state and moves it in the adapter -> holders maps (slot or
    loading; host RAM or disk); ``set_replicas`` fixes the membership and rebuilds the ring.
    ``rank`` then touches the adapter's slot holders, at most ``FAR_HOLDERS`` host/disk holders or
    those among its probes, the replicas its probes land on, and a copy of the sorted ids cut around
    those for the catch-all rank.
    """

    def __init__(self) -> None:
        self._states: dict[str, ReplicaState] = {}
        self._near: dict[str, set[str]] = {}  # adapter -> replicas with it in a slot or loading it
        self._far: dict[str, set[str]] = {}  # adapter -> replicas with it in host RAM or on disk
        self._ring = ReplicaRing(())
        self._ids: list[str] = []
        self._position: dict[str, int] = {}  # replica id -> its place in _ids
        self._near_sorted: dict[str, tuple[str, ...]] = {}  # adapter -> sorted _near[adapter], when asked
        self._probe_cache: dict[tuple[str, int], tuple[str, ...]] = {}  # (adapter, probe points) -> ring probes

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
            self._position = {r: i for i, r in enumerate(self._ids)}
            self._ring = ReplicaRing(live)
            self._probe_cache.clear()

    def update(self, state: ReplicaState) -> None:
        """A replica's new state (a replica not in the membership is added, without a ring rebuild
        until ``set_replicas``: call that when membership changes)."""
        old = self._states.get(state.replica_id, ReplicaState(state.replica_id))
        self._states[state.replica_id] = state
        self._move(old, state)

    def _move(self, old: ReplicaState, new: ReplicaState) -> None:
        changed = _move_between(self._near, old.replica_id, old.resident | old.loading, new.resident | new.loading)
        for adapter_id in changed:
            self._near_sorted.pop(adapter_id, None)
        _move_between(self._far, old.replica_id, old.host | old.disk, new.host | new.disk)

    def slot_holders(self, adapter_id: str) -> Collection[str]:
        """Replicas with the adapter in a slot or loading it (a live view: do not keep it)."""
        return self._near.get(adapter_id, ())

    def holders(self, adapter_id: str) -> frozenset[str]:
        """Replicas with the adapter in any tier."""
        return frozenset(self._near.get(adapter_id, ())) | self._far.get(adapter_id, set())

    def rank(
        self, adapter_id: str | None, settings: RouterSettings, inputs: RoutingInputs = NO_INPUTS
    ) -> list[list[str]]:
        """``rank_replicas`` over the indexed states (same ranks, same order within them)."""
        if not adapter_id:
            return [list(self._ids)] if self._ids else []
        states = self._states
        near_ids = self._near.get(adapter_id, ())
        near = self._sorted_near(adapter_id)
        extra = [r for r in inputs.recent if r in states and r not in near_ids]
        if extra:
            near = sorted((*near, *extra))
        far_all = self._far.get(adapter_id, ())
        probes = self._probes(adapter_id, settings.probe_points)
        if len(far_all) - len(near_ids) - len(extra) > FAR_HOLDERS:  # (a slot holder's host copy is not a far holder)
            far_all = {r for r in probes if r in far_all}
        far_ids = [r for r in far_all if r not in near_ids and r not in extra]
        if len(far_ids) > FAR_HOLDERS:
            far_ids = [r for r in far_ids if r in probes]
        return assemble_ranks(
            adapter_id, near, far_ids, probes,
            state_of=states.get, rest_of=self._rest_of, settings=settings, inputs=inputs,
        )

    def _sorted_near(self, adapter_id: str) -> tuple[str, ...]:
        """The adapter's slot holders, sorted; cached until they change (a hot adapter's hundred
        copies change far less often than it is asked for)."""
        cached = self._near_sorted.get(adapter_id)
        if cached is None:
            cached = tuple(sorted(self._near.get(adapter_id, ())))
            if len(self._near_sorted) >= CACHED_ADAPTERS:
                self._near_sorted.clear()
            self._near_sorted[adapter_id] = cached
        return cached

    def _probes(self, adapter_id: str, probe_points: int) -> tuple[str, ...]:
        """The adapter's probe sequence on the current ring, cached until the membership changes."""
        key = (adapter_id, probe_points)
        cached = self._probe_cache.get(key)
        if cached is None:
            cached = tuple(probe_sequence(adapter_id, probe_points, self._ring.successor)) if self._ids else ()
            if len(self._probe_cache) >= CACHED_ADAPTERS:
                self._probe_cache.clear()
            self._probe_cache[key] = cached
        return cached

    def _rest_of(self, placed: set[str]) -> list[str]:
        """Every replica not in ``placed``, sorted: the id list cut around ``placed``'s positions
        (a copy of the list and a few slices, not a membership test per replica)."""
        ids, position = self._ids, self._position
        cuts = sorted(map(position.get, placed, repeat(-1)))
        rest: list[str] = []
        begin = 0
        for cut in cuts[bisect_left(cuts, 0) :]:
            rest += ids[begin:cut]
            begin = cut + 1
        rest += ids[begin:]
        return rest
