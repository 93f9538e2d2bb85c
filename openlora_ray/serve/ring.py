"""The replica ring: where an adapter's cold placements and spills are probed.

Every router computes the same sequence of candidate replicas for an adapter (so independent
ingress replicas agree on where a cold adapter goes), different adapters get different sequences
(so cold adapters spread evenly), and a replica joining or leaving moves only the probes that land
on it. Pure functions and one small class; no Ray, no policy.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Collection, Iterator
from functools import lru_cache

MASK64 = (1 << 64) - 1
PROBE_STEP = 0x9E3779B97F4A7C15  # odd: probe points of one adapter never repeat within 2**64 steps
VNODE_STEP = 0xD6E8FEB86659FD93
VNODES = 32  # ring points per replica: shares of the probe points within about 1 / sqrt(32) of 1 / n


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


_replica_hash = lru_cache(maxsize=16384)(stable_hash)


def mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection on 64-bit ints with full avalanche."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


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


def probe_sequence(adapter_id: str, probe_points: int, successor: Callable[[int], str]) -> Iterator[str]:
    """The adapter's distinct candidate replicas in probe order (at most ``probe_points``
    probes; lazily, since a decision usually stops after the first few)."""
    seen: set[str] = set()
    adapter_hash = stable_hash(adapter_id)
    for j in range(probe_points):
        replica_id = successor(mix64((adapter_hash + j * PROBE_STEP) & MASK64))
        if replica_id not in seen:
            seen.add(replica_id)
            yield replica_id
