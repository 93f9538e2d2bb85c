"""What a replica reports about itself, and how the router reads it.

Replicas return ``ReplicaState.to_stats()`` from ``record_routing_stats``; the controller
re-broadcasts the dict to every router whenever it changes, so the figures that move every step
(free memory, queue) are quantised to keep that traffic low. The router rebuilds a
``ReplicaState`` with ``from_stats``; a replica that has not reported yet reads as empty.

Free capacity, what cold placement compares: free adapter slots first (a free slot means loading
evicts nothing), then free KV-cache blocks as a fraction of the replica's total (what decides how
many more requests it can run, the same on CPU and GPU). A replica whose engine does not report KV
blocks (``total_kv_blocks`` 0) falls back to its free device memory in MB (``free_vram_mb``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VRAM_QUANTUM_MB = 64
KV_QUANTA = 64  # free KV blocks are reported in steps of total / KV_QUANTA


@dataclass(frozen=True)
class ReplicaState:
    replica_id: str
    resident: frozenset[str] = frozenset()  # adapters in a device slot
    host: frozenset[str] = frozenset()  # adapters in the host-RAM tier
    disk: frozenset[str] = frozenset()  # adapters in the node-local disk cache
    loading: frozenset[str] = frozenset()  # adapters being fetched/validated right now
    num_slots: int = 0
    free_slots: int = 0
    free_vram_mb: int = 0  # the fallback capacity figure when KV blocks are not reported
    free_kv_blocks: int = 0  # free KV-cache blocks (paged engine)
    total_kv_blocks: int = 0  # 0 = the engine does not report KV blocks
    queued: int = 0  # requests waiting in the engine
    running: int = 0  # requests decoding
    max_running: int = 1

    @property
    def load(self) -> float:
        """Occupancy in [0, inf): running plus queued over what the replica decodes at once."""
        return (self.running + self.queued) / max(1, self.max_running)

    @property
    def free_kv_fraction(self) -> float | None:
        """Free KV-cache blocks over the total, or None when the engine does not report them."""
        return self.free_kv_blocks / self.total_kv_blocks if self.total_kv_blocks > 0 else None

    def holds(self, adapter_id: str) -> bool:
        return adapter_id in self.resident or adapter_id in self.host or adapter_id in self.disk or adapter_id in self.loading

    def to_stats(self) -> dict[str, Any]:
        return {
            "replica_id": self.replica_id,
            "resident": sorted(self.resident),
            "host": sorted(self.host),
            "disk": sorted(self.disk),
            "loading": sorted(self.loading),
            "num_slots": self.num_slots,
            "free_slots": self.free_slots,
            "free_vram_mb": self.free_vram_mb // VRAM_QUANTUM_MB * VRAM_QUANTUM_MB,
            "free_kv_blocks": self.free_kv_blocks // (q := max(1, self.total_kv_blocks // KV_QUANTA)) * q,
            "total_kv_blocks": self.total_kv_blocks,
            "queued": self.queued,
            "running": self.running,
            "max_running": self.max_running,
        }

    @classmethod
    def from_stats(cls, replica_id: str, stats: dict[str, Any]) -> "ReplicaState":
        if not stats:
            return cls(replica_id)
        return cls(
            replica_id=replica_id,
            resident=frozenset(stats.get("resident", ())),
            host=frozenset(stats.get("host", ())),
            disk=frozenset(stats.get("disk", ())),
            loading=frozenset(stats.get("loading", ())),
            num_slots=int(stats.get("num_slots", 0)),
            free_slots=int(stats.get("free_slots", 0)),
            free_vram_mb=int(stats.get("free_vram_mb", 0)),
            free_kv_blocks=int(stats.get("free_kv_blocks", 0)),
            total_kv_blocks=int(stats.get("total_kv_blocks", 0)),
            queued=int(stats.get("queued", 0)),
            running=int(stats.get("running", 0)),
            max_running=int(stats.get("max_running", 1)),
        )
