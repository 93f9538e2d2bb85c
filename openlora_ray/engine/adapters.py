"""Getting adapters into slots for the engine loop: background reads, slot pins, operator pins.

Files are fetched, validated and read by worker threads (``read_lora``); everything that touches
torch (``to_weights``, the copy into a slot) happens on the loop thread, which calls every method
here (see ``RawLora`` for why). This object is the scheduler's ``AdapterGate``: a sequence is
admitted once its adapter is pinned in a slot, and it computes under that adapter's *KV identity*,
the content digest of the files the slot's weights came from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from openlora_ray.adapter_format import BaseModelDims
from openlora_ray.engine.scheduler import Seq
from openlora_ray.errors import AdapterNotFoundError, CapacityError, InvalidAdapterError
from openlora_ray.lora.ops import NO_ADAPTER
from openlora_ray.lora.slots import SlotManager
from openlora_ray.lora.weights import LoraWeights, RawLora, read_lora, to_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedAdapter:
    """A local adapter folder and the content digest of its files (the store's manifest has it)."""

    path: Path
    digest: str


# adapter id -> its local folder (blocking; runs in a worker). A bare Path is hashed on read.
AdapterResolver = Callable[[str], ResolvedAdapter | Path]


class AdapterManager:
    def __init__(
        self,
        slots: SlotManager,
        *,
        resolver: AdapterResolver | None,
        dims: BaseModelDims,
        max_rank: int,
        dtype: torch.dtype,
        workers: int,
        wake: Callable[[], None],
        base_identity: str,
    ) -> None:
        self.slots = slots
        self._resolver = resolver
        self._dims, self._max_rank, self._dtype = dims, max_rank, dtype
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="adapter-load")
        self._wake = wake
        self.base_identity = base_identity
        self._loading: dict[str, Future[RawLora]] = {}
        self._ready: dict[str, LoraWeights] = {}  # read and converted, waiting for a free slot
        self.operator_pins: set[str] = set()

    # ----------------------------------------------------------------- the scheduler's gate
    def acquire(self, seq: Seq) -> str | None:
        aid = seq.adapter_id
        if aid is None:
            return self.base_identity
        if self.slots.slot_of(aid) is None and aid not in self.slots.host and aid not in self._ready:
            self._start_load(aid)
            return None
        try:
            self.slots.acquire(aid, self._ready.pop)
        except CapacityError:  # every slot pinned by running rows: wait for one to finish
            return None
        return "lora:" + self.slots.weights(aid).digest

    def release(self, seq: Seq) -> None:
        if seq.adapter_id is not None:
            self.slots.release(seq.adapter_id)

    def slot(self, adapter_id: str | None) -> int:
        """The slot of a pinned adapter (``NO_ADAPTER`` for the base model)."""
        return NO_ADAPTER if adapter_id is None else self.slots.slot_of(adapter_id)

    # ------------------------------------------------------------------- background loads
    def collect(self) -> list[tuple[str, Exception]]:
        """Convert finished reads (on the loop thread); the adapters that failed, with why."""
        failed = []
        for adapter_id, fut in list(self._loading.items()):
            if not fut.done():
                continue
            del self._loading[adapter_id]
            err = fut.exception()
            if err is None:
                try:
                    self._ready[adapter_id] = to_weights(fut.result(), self._dtype)
                    continue
                except InvalidAdapterError as e:
                    err = e
            log.warning("adapter %s failed to load: %s", adapter_id, err)
            failed.append((adapter_id, err))
        return failed

    def park(self, needed: Iterable[str | None]) -> None:
        """Move read adapters nobody waits for any more to the host tier."""
        keep = set(needed)
        for aid in [a for a in self._ready if a not in keep]:
            self.slots.host.put(self._ready.pop(aid))

    @property
    def loading(self) -> tuple[str, ...]:
        return tuple(self._loading) + tuple(self._ready)

    def _start_load(self, adapter_id: str) -> None:
        if adapter_id in self._loading:
            return
        fut = self._pool.submit(self.read, adapter_id)
        fut.add_done_callback(lambda _: self._wake())
        self._loading[adapter_id] = fut

    def read(self, adapter_id: str) -> RawLora:
        """Worker thread: resolve to a local folder, validate, read (``to_weights`` follows on the loop)."""
        if self._resolver is None:
            raise AdapterNotFoundError(adapter_id, "this engine (no adapter store configured)")
        resolved = self._resolver(adapter_id)
        if isinstance(resolved, ResolvedAdapter):
            return read_lora(adapter_id, resolved.path, self._dims, self._max_rank, resolved.digest)
        return read_lora(adapter_id, resolved, self._dims, self._max_rank)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------- operator actions
    def load(self, raw: RawLora) -> int:
        """Copy an adapter read off the loop into a slot (prefetch)."""
        return self.slots.load(to_weights(raw, self._dtype))

    def pin(self, adapter_id: str) -> int:
        """Keep an adapter resident until ``unpin``. At most ``num_slots - 1`` adapters are pinned
        this way, so operators can never leave requests for other adapters without a slot."""
        if adapter_id in self.operator_pins:
            return self.slots.slot_of(adapter_id)
        limit = self.slots.buffers.num_slots - 1
        if len(self.operator_pins) >= limit:
            raise CapacityError(
                f"{len(self.operator_pins)} adapters are pinned on this replica, the most its {limit + 1} slots allow; "
                "unpin one first"
            )
        slot = self.slots.acquire(adapter_id, lambda aid: to_weights(self.read(aid), self._dtype))
        self.operator_pins.add(adapter_id)
        return slot

    def unpin(self, adapter_id: str) -> None:
        if adapter_id in self.operator_pins:
            self.operator_pins.discard(adapter_id)
            self.slots.release(adapter_id)
