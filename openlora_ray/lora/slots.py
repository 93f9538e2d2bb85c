"""Which adapter sits in which slot: loading, pinning, eviction and a host-RAM tier.

Eviction takes the least recently used unpinned slot, or, with ``eviction_half_life_s``, the one
whose adapter this replica was asked for least lately (``RequestCounts``; least recently used among
equals). Why counts: a replica's slots see a stream of one-off adapters between the requests of an
adapter asked for every minute or two; LRU lets 16 one-offs push it out, counts keep it and let the
one-offs replace one another (``bench routing-sim --eviction-half-life-s``: 0.686 -> 0.736 slot
hit rate on its 100-replica Zipf 1.0 trace, no queueing).

Both tiers are keyed by the adapter's *content digest* (``LoraWeights.digest``), not its name: a
name, even ``name@version``, can come to mean other files (a store object replaced by hand, a
re-pushed latest), and a tier keyed by the name would keep serving the old weights. Keyed by
content, new files simply miss and are loaded; identical files under two names share one copy.

The manager owns bookkeeping only; the tensors live in the model's pre-allocated buffers, which it
fills through the small ``SlotBuffers`` protocol. It is used from one thread (the engine loop):
adapters are read from disk elsewhere, and only the copy into a slot happens here.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from openlora_ray.errors import AdapterInUseError, CapacityError, OpenLoraError

if TYPE_CHECKING:  # annotations only: the routing simulator uses the eviction rule without torch
    from openlora_ray.lora.weights import LoraWeights

log = logging.getLogger(__name__)


class SlotBuffers(Protocol):
    num_slots: int

    def write_slot(self, slot: int, weights: LoraWeights) -> None:
        """Replace the slot's contents with ``weights`` (whatever it held before)."""

    def clear_slot(self, slot: int) -> None: ...


@dataclass(frozen=True)
class SlotState:
    key: str | None  # content digest of what the slot holds; None = free
    pins: int  # in-flight requests using the slot
    last_used: int  # logical clock of the last acquire
    requests: float = 0.0  # the adapter's decayed request count (0 everywhere when counts are off)


def choose_slot(slots: Sequence[SlotState]) -> int | None:
    """Where a new adapter goes: a free slot, else the unpinned one with the fewest requests lately
    (the least recently used of equals: plain LRU when nothing is counted), else None."""
    free = [i for i, s in enumerate(slots) if s.key is None]
    if free:
        return free[0]
    idle = [i for i, s in enumerate(slots) if s.pins == 0]
    return min(idle, key=lambda i: (slots[i].requests, slots[i].last_used)) if idle else None


class RequestCounts:
    """Requests per key, halving every ``half_life_s``: stored scaled by ``2 ** ((t - base) / half_life_s)``
    so that comparing two counts is comparing two stored numbers; the base moves up (and counts
    decayed below ``FORGET`` are dropped) once the scale passes ``REBASE``, so memory follows the
    adapters asked for lately."""

    FORGET = 1e-3
    REBASE = 2.0**20

    def __init__(self, half_life_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.half_life_s = half_life_s
        self.clock = clock
        self._scaled: dict[str, float] = {}
        self._base = clock()

    def __len__(self) -> int:
        return len(self._scaled)

    def record(self, key: str) -> None:
        now = self.clock()
        scale = 2.0 ** ((now - self._base) / self.half_life_s)
        if scale > self.REBASE:
            self._scaled = {k: v / scale for k, v in self._scaled.items() if v / scale >= self.FORGET}
            self._base, scale = now, 1.0
        self._scaled[key] = self._scaled.get(key, 0.0) + scale

    def scaled(self, key: str) -> float:
        """The key's count on the current scale (comparable between keys, not across rebases)."""
        return self._scaled.get(key, 0.0)


class HostCache:
    """Recently evicted adapters kept in host RAM, LRU under a byte budget, by content digest.

    The budget counts each adapter at its own rank (``LoraWeights.nbytes``), not at the padded
    slot size, so many small adapters fit where a few large ones would.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, LoraWeights] = OrderedDict()
        self.nbytes = 0

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def ids(self) -> list[str]:
        """The adapter ids the held weights were loaded under, least recently used first."""
        return [w.adapter_id for w in self._entries.values()]

    def keys_of(self, adapter_id: str) -> list[str]:
        return [k for k, w in self._entries.items() if w.adapter_id == adapter_id]

    def get(self, key: str) -> LoraWeights | None:
        weights = self._entries.get(key)
        if weights is not None:
            self._entries.move_to_end(key)
        return weights

    def put(self, weights: LoraWeights) -> None:
        self.pop(weights.digest)
        if weights.nbytes > self.budget_bytes:
            return
        while self.nbytes + weights.nbytes > self.budget_bytes:
            self.pop(next(iter(self._entries)))
        self._entries[weights.digest] = weights
        self.nbytes += weights.nbytes

    def pop(self, key: str) -> None:
        weights = self._entries.pop(key, None)
        if weights is not None:
            self.nbytes -= weights.nbytes


class SlotManager:
    """Maps adapters (by content digest: the *key*) to slots; a pinned slot is never evicted."""

    def __init__(
        self,
        buffers: SlotBuffers,
        host_cache_bytes: int,
        *,
        eviction_half_life_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.buffers = buffers
        self.host = HostCache(host_cache_bytes)
        self.requests = RequestCounts(eviction_half_life_s, clock) if eviction_half_life_s > 0 else None
        n = buffers.num_slots
        self._key: list[str | None] = [None] * n
        self._weights: list[LoraWeights | None] = [None] * n
        self._pins = [0] * n
        self._last_used = [0] * n
        self._clock = 0
        self._slot_of: dict[str, int] = {}
        # Where each acquire found its adapter: "slot" (already resident), "host" (host tier) or
        # "fetch" (the caller's loader); counters for metrics.
        self.loads_by_tier = {"slot": 0, "host": 0, "fetch": 0}
        self.evictions = 0

    # ------------------------------------------------------------------ views
    def states(self) -> list[SlotState]:
        counts = self.requests
        return [
            SlotState(k, p, t, counts.scaled(k) if counts is not None and k is not None else 0.0)
            for k, p, t in zip(self._key, self._pins, self._last_used)
        ]

    def count_request(self, key: str) -> None:
        """One request admitted for the adapter of digest ``key`` (eviction by counts; a no-op
        under LRU). Called once per request, not per ``acquire``: a request can acquire again
        after a slot still copying was released."""
        if self.requests is not None:
            self.requests.record(key)

    def slot_of(self, key: str) -> int | None:
        return self._slot_of.get(key)

    def resident(self) -> list[str]:
        """The adapter ids the resident weights were loaded under (what routing is told)."""
        return [self._weights[slot].adapter_id for slot in self._slot_of.values()]

    def keys_of(self, adapter_id: str) -> list[str]:
        """Keys of every copy, in a slot or the host tier, loaded under ``adapter_id``."""
        resident = [k for k, slot in self._slot_of.items() if self._weights[slot].adapter_id == adapter_id]
        return resident + self.host.keys_of(adapter_id)

    @property
    def free_slots(self) -> int:
        return self._key.count(None)

    def pins(self, key: str) -> int:
        slot = self._slot_of.get(key)
        return 0 if slot is None else self._pins[slot]

    # -------------------------------------------------------------- lifecycle
    def acquire(self, key: str, fetch: Callable[[str], LoraWeights]) -> int:
        """Pin the weights of digest ``key`` in a slot, from the host tier or ``fetch(key)`` if needed.

        Raises ``CapacityError`` when every slot is pinned; errors from ``fetch`` propagate and
        leave every slot as it was.
        """
        slot = self._slot_of.get(key)
        if slot is None:
            if choose_slot(self.states()) is None:  # check before fetch, so nothing is fetched in vain
                raise self._no_slot(key)
            weights = self.host.get(key)
            tier = "host" if weights is not None else "fetch"
            weights = weights or fetch(key)
            if weights.digest != key:
                raise OpenLoraError(f"asked for the adapter of digest {key[:12]}, fetched {weights.digest[:12]}")
            slot = self.load(weights)
            self.loads_by_tier[tier] += 1
        else:
            self.loads_by_tier["slot"] += 1
        self._pins[slot] += 1
        self._touch(slot)
        return slot

    def release(self, key: str) -> None:
        """Drop one pin; the adapter stays resident until its slot is needed."""
        slot = self._slot_of.get(key)
        if slot is None or self._pins[slot] == 0:
            raise OpenLoraError(f"adapter {key!r} is not pinned")
        self._pins[slot] -= 1

    def load(self, weights: LoraWeights) -> int:
        """Copy ``weights`` into a slot (evicting the LRU unpinned adapter if none is free)."""
        slot = self._slot_of.get(weights.digest)
        if slot is not None:
            return slot
        slot = choose_slot(self.states())
        if slot is None:
            raise self._no_slot(weights.adapter_id)
        if self._key[slot] is not None:
            self._evict(slot)
        self.buffers.write_slot(slot, weights)
        self.host.pop(weights.digest)
        self._key[slot], self._weights[slot] = weights.digest, weights
        self._slot_of[weights.digest] = slot
        self._touch(slot)
        log.debug("loaded %s into slot %d", weights.adapter_id, slot)
        return slot

    def unload(self, key: str) -> None:
        """Remove an adapter from its slot and from the host tier (e.g. the adapter was deleted)."""
        slot = self._slot_of.get(key)
        if slot is not None:
            if self._pins[slot]:
                name = self._weights[slot].adapter_id
                raise AdapterInUseError(f"adapter {name!r} is in use ({self._pins[slot]} running request(s) or pins); unpin it or retry")
            self._free(slot)
        self.host.pop(key)

    # --------------------------------------------------------------- helpers
    def _no_slot(self, adapter: str) -> CapacityError:
        return CapacityError(
            f"all {self.buffers.num_slots} adapter slots are in use by running requests; "
            f"cannot load {adapter!r} now, retry shortly"
        )

    def _evict(self, slot: int) -> None:
        weights = self._weights[slot]
        assert weights is not None
        log.debug("evicting %s from slot %d to the host tier", weights.adapter_id, slot)
        self.evictions += 1
        self._free(slot, clear=False)  # the load that follows overwrites the whole slot
        self.host.put(weights)

    def _free(self, slot: int, clear: bool = True) -> None:
        key = self._key[slot]
        if clear:
            self.buffers.clear_slot(slot)
        del self._slot_of[key]
        self._key[slot], self._weights[slot] = None, None
        self._last_used[slot] = 0

    def _touch(self, slot: int) -> None:
        self._clock += 1
        self._last_used[slot] = self._clock
