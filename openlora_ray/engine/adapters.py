"""Getting adapters into slots for the engine loop: background reads, slot pins, operator pins.

Files are fetched, validated, read and converted to float32 by worker threads (``read_lora``, numpy
only); what runs torch ops (``to_weights``' cast to the model's dtype, the copy into a slot) happens
on the loop thread, which calls every method here (see ``RawLora`` for why). This object is the
scheduler's ``AdapterGate``: a sequence is admitted once its adapter is pinned in a slot, and it
computes under that adapter's *KV identity*, the content digest of the files the slot's weights
came from.

An adapter id is a name; what it means can change (a re-pushed latest, store objects replaced by
hand). So an id is first *resolved* to a local folder and the content digest of its files (by a
worker: it may ask the store), trusted for ``recheck_s``, and every tier here (reads, slots, host)
is keyed by that digest: new content under an old name is a miss and is read, never the old
weights served. A running sequence keeps the weights it was admitted with until it finishes.

Slot writes go through a ``SlotTransfer`` (``lora/transfer.py``): on CUDA they run on a side stream
from pinned host memory, and a sequence is admitted onto a slot whose copy is still in flight only
when no other rows are running (they would wait for it); otherwise it waits a step or two.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from openlora_ray.adapter_digest import CONTENT_FILES, folder_digest
from openlora_ray.adapter_format import BaseModelDims
from openlora_ray.engine.scheduler import Seq
from openlora_ray.errors import AdapterNotFoundError, CapacityError, InvalidAdapterError
from openlora_ray.lora.ops import NO_ADAPTER
from openlora_ray.lora.slots import SlotManager
from openlora_ray.lora.transfer import InlineTransfer, SlotTransfer
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
        recheck_s: float = 1.0,
        transfer: SlotTransfer | None = None,
        rows_running: Callable[[], bool] = lambda: False,
    ) -> None:
        """``transfer`` must be the one ``slots``' buffers write through (``TransferredSlots``);
        ``rows_running`` says whether any sequence is running (their steps must not wait for a load)."""
        self.slots = slots
        self._resolver = resolver
        self._dims, self._max_rank, self._dtype = dims, max_rank, dtype
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="adapter-load")
        self._wake = wake
        self.base_identity = base_identity
        self._recheck_s = recheck_s
        self._transfer = transfer or InlineTransfer()
        self._rows_running = rows_running
        self._resolved: dict[str, tuple[ResolvedAdapter, float]] = {}  # adapter id -> (what, trusted until)
        self._resolving: dict[str, Future[ResolvedAdapter]] = {}
        self._loading: dict[str, tuple[str, Future[RawLora]]] = {}  # digest -> (adapter id, read)
        self._ready: dict[str, LoraWeights] = {}  # by digest: read and converted, waiting for a slot
        self._held: dict[Seq, str] = {}  # admitted sequence -> digest of the slot it pinned
        self._hashed: dict[tuple, str] = {}  # digests of bare-Path folders, by their files' stat
        self.operator_pins: dict[str, str] = {}  # adapter id -> digest pinned for it

    # ----------------------------------------------------------------- the scheduler's gate
    def acquire(self, seq: Seq) -> str | None:
        if seq.adapter_id is None:
            return self.base_identity
        key = self._at_hand(seq.adapter_id)
        if key is None:
            return None
        try:
            slot = self.slots.acquire(key, self._ready.pop)
        except CapacityError:  # every slot pinned by running rows: wait for one to finish
            return None
        if not self._transfer.ready(slot) and self._rows_running():
            self.slots.release(key)  # still copying: admitted once the copy is done, so no row waits
            return None
        self._transfer.await_slot(slot)
        self._held[seq] = key
        self.slots.count_request(key)
        return "lora:" + key

    def release(self, seq: Seq) -> None:
        key = self._held.pop(seq, None)
        if key is not None:
            self.slots.release(key)

    def slot(self, seq: Seq) -> int:
        """The slot of an admitted sequence's adapter (``NO_ADAPTER`` for the base model)."""
        key = self._held.get(seq)
        return NO_ADAPTER if key is None else self.slots.slot_of(key)

    def prepare(self, waiting: Iterable[Seq], depth: int) -> None:
        """Get the adapters of the first ``depth`` waiting sequences read ahead of their admission
        (resolves and reads run in workers, overlapped with the steps), and move read adapters no
        sequence waits for any more to the host tier."""
        needed: set[str] = set()
        for seq in itertools.islice((s for s in waiting if s.adapter_id is not None), depth):
            self._at_hand(seq.adapter_id)
            entry = self._resolved.get(seq.adapter_id)
            if entry is not None:
                needed.add(entry[0].digest)
        for key in [k for k in self._ready if k not in needed]:
            self.slots.host.put(self._ready.pop(key))

    def _at_hand(self, adapter_id: str) -> str | None:
        """The digest ``adapter_id`` means now, if those weights are in a slot, the host tier or read;
        otherwise None, after starting what gets them there (a resolve, then a read)."""
        entry = self._resolved.get(adapter_id)
        if entry is None or entry[1] <= time.monotonic():
            self._start_resolve(adapter_id)
            return None
        resolved = entry[0]
        key = resolved.digest
        if self.slots.slot_of(key) is None and key not in self.slots.host and key not in self._ready:
            self._start_read(adapter_id, resolved)
            return None
        return key

    # ------------------------------------------------------------------- background work
    def collect(self) -> list[tuple[str, Exception]]:
        """Take finished resolves and reads (converting on the loop thread); the adapter ids that
        failed, with why."""
        failed: list[tuple[str, Exception]] = []
        for adapter_id, fut in [(a, f) for a, f in self._resolving.items() if f.done()]:
            del self._resolving[adapter_id]
            err = fut.exception()
            if err is None:
                self._resolved[adapter_id] = (fut.result(), time.monotonic() + self._recheck_s)
                self._at_hand(adapter_id)  # start the read now if the weights are nowhere at hand
            else:
                failed.append((adapter_id, err))
        for key, (adapter_id, fut) in [(k, v) for k, v in self._loading.items() if v[1].done()]:
            del self._loading[key]
            err = fut.exception()
            if err is None:
                try:
                    self._ready[key] = self._transfer.stage(to_weights(fut.result(), self._dtype))
                    continue
                except InvalidAdapterError as e:
                    err = e
            failed.append((adapter_id, err))
        for adapter_id, err in failed:
            log.warning("adapter %s failed to load: %s", adapter_id, err)
        return failed

    @property
    def loading(self) -> tuple[str, ...]:
        reading = (a for a, _ in self._loading.values())
        return tuple(dict.fromkeys((*self._resolving, *reading, *(w.adapter_id for w in self._ready.values()))))

    def _start_resolve(self, adapter_id: str) -> None:
        if adapter_id not in self._resolving:
            self._resolving[adapter_id] = self._submit(self.resolve, adapter_id)

    def _start_read(self, adapter_id: str, resolved: ResolvedAdapter) -> None:
        if resolved.digest not in self._loading:
            self._loading[resolved.digest] = (adapter_id, self._submit(self._read, adapter_id, resolved))

    def _submit(self, fn: Callable, *args: object) -> Future:
        fut = self._pool.submit(fn, *args)
        fut.add_done_callback(lambda _: self._wake())
        return fut

    def resolve(self, adapter_id: str) -> ResolvedAdapter:
        """Worker thread: the adapter's local folder and content digest, as of now."""
        if self._resolver is None:
            raise AdapterNotFoundError(adapter_id, "this engine (no adapter store configured)")
        resolved = self._resolver(adapter_id)
        if isinstance(resolved, ResolvedAdapter):
            return resolved
        return ResolvedAdapter(resolved, self._hash_folder(Path(resolved)))

    def _hash_folder(self, folder: Path) -> str:
        """A bare folder's digest, hashed again only when its files change (size, mtime, inode)."""
        sig = (str(folder.resolve()), *((st.st_size, st.st_mtime_ns, st.st_ino) for st in
                                        (os.stat(folder / f) for f in CONTENT_FILES)))
        digest = self._hashed.get(sig)
        if digest is None:
            digest = self._hashed[sig] = folder_digest(folder)
        return digest

    def _read(self, adapter_id: str, resolved: ResolvedAdapter) -> RawLora:
        """Worker thread: validate and read (``to_weights`` follows on the loop)."""
        return read_lora(adapter_id, resolved.path, self._dims, self._max_rank, resolved.digest)

    def read(self, adapter_id: str) -> RawLora:
        """Resolve and read in one call (blocking: for a worker thread)."""
        return self._read(adapter_id, self.resolve(adapter_id))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------- operator actions
    def load(self, raw: RawLora, pin: bool = False) -> int:
        """Copy an adapter read off the loop into a slot (prefetch). ``pin`` keeps it resident until
        ``unpin``; at most ``num_slots - 1`` adapters are pinned this way, so operators can never
        leave requests for other adapters without a slot. Re-pinning an id whose content changed
        moves the pin to the new weights."""
        key = raw.digest
        if not pin:
            self.slots.count_request(key)  # counted as one request: eviction by counts keeps it a while
            slot = self.slots.slot_of(key)
            return slot if slot is not None else self.slots.load(self._weights(raw))
        old = self.operator_pins.get(raw.adapter_id)
        if old == key:
            return self.slots.slot_of(key)
        limit = self.slots.buffers.num_slots - 1
        if old is None and len(self.operator_pins) >= limit:
            raise CapacityError(
                f"{len(self.operator_pins)} adapters are pinned on this replica, the most its {limit + 1} slots allow; "
                "unpin one first"
            )
        slot = self.slots.acquire(key, lambda _: self._weights(raw))
        if old is not None:
            self.slots.release(old)
        self.operator_pins[raw.adapter_id] = key
        return slot

    def _weights(self, raw: RawLora) -> LoraWeights:
        return self._transfer.stage(to_weights(raw, self._dtype))

    def unpin(self, adapter_id: str) -> None:
        key = self.operator_pins.pop(adapter_id, None)
        if key is not None:
            self.slots.release(key)

    def evict(self, adapter_id: str) -> None:
        """Drop every copy loaded under ``adapter_id`` from the slots and the host tier; refused
        (nothing dropped) while a request or an operator pin uses one."""
        keys = self.slots.keys_of(adapter_id)
        busy = [k for k in keys if self.slots.pins(k)]
        if busy:
            self.slots.unload(busy[0])  # raises AdapterInUseError, naming the adapter
        for key in keys:
            self.slots.unload(key)
        self._resolved.pop(adapter_id, None)
