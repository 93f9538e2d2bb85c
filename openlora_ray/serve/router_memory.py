"""What one router remembers of its own traffic: request counts per adapter (``Popularity``),
where it sent each adapter lately (``RecentSends``) and the requests it has in flight
(``InFlight``). Each router keeps its own; none of it is shared, so it needs no coordination, and
the routing policy reads it as plain inputs (``routing.RoutingInputs``). No Ray import.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from itertools import repeat


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
        return self._heat_of(min(map(self._scaled.get, adapter_ids, repeat(0.0)), default=0.0), now)

    def record(self, adapter_id: str, now: float) -> None:
        if now - self._last_prune >= self.half_life_s:
            self._prune(now)
        self._scaled[adapter_id] = self._scaled.get(adapter_id, 0.0) + self._scale(now)

    def _prune(self, now: float) -> None:
        """Rebase the scale to ``now`` and drop the counts that decayed below ``FORGET``."""
        factor = 1.0 / self._scale(now)
        self._scaled = {a: v * factor for a, v in self._scaled.items() if v * factor >= self.FORGET}
        self._base, self._last_prune = now, now


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
