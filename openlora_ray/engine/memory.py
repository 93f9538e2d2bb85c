"""One memory budget for a replica: the weights and adapter slots first, KV blocks get the rest.

Pure arithmetic, so the split is testable without a device. The slots are pre-allocated with the
model (their buffers count as the model's), so what is left of the budget after the model is what
the KV pool may take. More blocks than the running batch could ever fill are not allocated: at most
``RETENTION`` times ``max_running`` sequences of ``max_seq_len`` tokens, the surplus past one full
batch being what keeps finished requests' prefixes cached.
"""

from __future__ import annotations

from dataclasses import dataclass

from openlora_ray.errors import OpenLoraError

RETENTION = 4


@dataclass(frozen=True)
class MemoryPlan:
    budget_bytes: int
    model_bytes: int  # weights plus the adapter slots' buffers
    slot_bytes: int  # one slot
    block_bytes: int  # one KV block, all layers, keys and values
    block_size: int
    num_blocks: int

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def describe(self, num_slots: int, max_rank: int) -> str:
        return (
            f"{self.num_blocks} KV blocks ({self.kv_tokens} tokens, {self.num_blocks * self.block_bytes / 2**20:.0f} MiB), "
            f"{num_slots} slots of rank {max_rank} ({num_slots * self.slot_bytes / 2**20:.0f} MiB), "
            f"weights {(self.model_bytes - num_slots * self.slot_bytes) / 2**20:.0f} MiB, "
            f"budget {self.budget_bytes / 2**20:.0f} MiB"
        )


def plan_memory(
    *,
    budget_bytes: int,
    model_bytes: int,
    slot_bytes: int,
    block_bytes: int,
    block_size: int,
    max_running: int,
    max_seq_len: int,
    num_blocks: int | None = None,
) -> MemoryPlan:
    """How many KV blocks the budget holds (or ``num_blocks`` if given); refuses a budget that
    cannot hold one sequence of ``max_seq_len`` tokens, naming what would."""
    per_seq = -(-max_seq_len // block_size)
    if num_blocks is None:
        num_blocks = min(max(0, budget_bytes - model_bytes) // block_bytes, RETENTION * max_running * per_seq)
    if num_blocks < per_seq:
        need = model_bytes + per_seq * block_bytes
        raise OpenLoraError(
            f"the KV cache holds {num_blocks * block_size} tokens, less than one sequence of max_seq_len "
            f"{max_seq_len}: raise the memory budget to at least {need / 2**20:.0f} MiB (weights and slots take "
            f"{model_bytes / 2**20:.0f} MiB), or lower max_seq_len"
        )
    return MemoryPlan(budget_bytes, model_bytes, slot_bytes, block_bytes, block_size, num_blocks)
