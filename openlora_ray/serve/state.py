"""What a replica reports about itself, and how the router reads it.

Replicas return ``ReplicaState.to_stats()`` from ``record_routing_stats``; the controller
re-broadcasts the dict to every router whenever it changes, so the figures that move every step
(free memory, queue) are quantised to keep that traffic low. The router rebuilds a
``ReplicaState`` with ``from_stats``; a replica that has not reported yet reads as empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VRAM_QUANTUM_MB = 64


@dataclass(frozen=True)
class ReplicaState:
    replica_id: str
    resident: frozenset[str] = frozenset()  # adapters in a device slot
    host: frozenset[str] = frozenset()  # adapters in the host-RAM tier
    disk: frozenset[str] = frozenset()  # adapters in the node-local disk cache
    loading: frozenset[str] = frozenset()  # adapters being fetched/validated right now
    num_slots: int = 0
    free_slots: int = 0
    free_vram_mb: int = 0
    queued: int = 0  # requests waiting in the engine
    running: int = 0  # requests decoding
    max_running: int = 1

    @property
    def load(self) -> float:
        """Occupancy in [0, inf): running plus queued over what the replica decodes at once."""
        return (self.running + self.queued) / max(1, self.max_running)

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
            queued=int(stats.get("queued", 0)),
            running=int(stats.get("running", 0)),
            max_running=int(stats.get("max_running", 1)),
        )
