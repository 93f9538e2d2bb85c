"""How an adapter gets from the host tier into a slot: inline on CPU, on a side stream on CUDA.

On CPU the copy is a plain ``write_slot`` on the loop thread: the engine keeps all torch work on
that one thread (``RawLora`` says why), and there is no second engine to overlap with.

On CUDA a copy from pageable memory is synchronous (the driver stages it through a bounce buffer
while the host waits), and ~450 of them per adapter on the compute stream would queue behind the
running step and hold the next one back. So there the host tier keeps its tensors in pinned
(page-locked) memory, every slot write runs on a side stream with ``non_blocking`` copies, and an
event recorded after it marks when the slot is ready. The gate (``engine/adapters.py``) admits a
row onto a slot only once that event has completed, while other rows are decoding, so they never
wait for a load; and makes the compute stream wait on the event (on the device, not the host)
before any row reads the slot.

The stream and event calls go through ``StreamBackend`` so the ordering logic is tested on CPU with
a fake; ``CudaBackend`` is the real one (``make gpu-check`` runs it on a GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any, Protocol

import torch

from openlora_ray.lora.slots import SlotBuffers
from openlora_ray.lora.weights import LoraWeights


class StreamBackend(Protocol):
    """The few stream, event and pinned-memory operations the side-stream copy needs."""

    def new_stream(self) -> Any: ...

    def on_stream(self, stream: Any) -> AbstractContextManager: ...

    def wait_compute(self, stream: Any) -> None:
        """Make ``stream`` wait (on the device) for the work queued on the compute stream so far."""

    def record(self, stream: Any) -> Any:
        """An event marking the work queued on ``stream`` so far."""

    def done(self, event: Any) -> bool:
        """Whether the event's work has completed (never blocks the host)."""

    def compute_wait(self, event: Any) -> None:
        """Make the compute stream wait (on the device) for ``event``."""

    def pin(self, tensor: torch.Tensor) -> torch.Tensor: ...


class CudaBackend:
    """``StreamBackend`` on a CUDA device: the compute stream is the loop thread's current one."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def new_stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def on_stream(self, stream: torch.cuda.Stream) -> AbstractContextManager:
        return torch.cuda.stream(stream)

    def wait_compute(self, stream: torch.cuda.Stream) -> None:
        stream.wait_stream(torch.cuda.current_stream(self.device))

    def record(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        return stream.record_event()

    def done(self, event: torch.cuda.Event) -> bool:
        return event.query()

    def compute_wait(self, event: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if tensor.is_pinned() else tensor.pin_memory()


class InlineTransfer:
    """CPU: host tensors as they are, slot writes on the calling thread, every slot always ready."""

    def stage(self, weights: LoraWeights) -> LoraWeights:
        return weights

    def run(self, slot: int, write: Callable[[], None]) -> None:
        write()

    def ready(self, slot: int) -> bool:
        return True

    def await_slot(self, slot: int) -> None:
        pass


class StreamTransfer:
    """CUDA: pinned host tensors, slot writes on a side stream, one completion event per slot."""

    def __init__(self, backend: StreamBackend) -> None:
        self._backend = backend
        self._stream = backend.new_stream()
        self._pending: dict[int, Any] = {}  # slot -> event of its last write, until seen complete

    def stage(self, weights: LoraWeights) -> LoraWeights:
        """The same weights in pinned memory, so their copies to the device can be asynchronous."""
        pin = self._backend.pin
        return replace(weights, modules={k: (pin(a), pin(b)) for k, (a, b) in weights.modules.items()})

    def run(self, slot: int, write: Callable[[], None]) -> None:
        """Queue ``write`` on the side stream after what the compute stream has queued (rows that
        read the slot's previous occupant finish first); the host does not wait for it."""
        self._backend.wait_compute(self._stream)
        with self._backend.on_stream(self._stream):
            write()
        self._pending[slot] = self._backend.record(self._stream)

    def ready(self, slot: int) -> bool:
        event = self._pending.get(slot)
        if event is None or self._backend.done(event):
            self._pending.pop(slot, None)
            return True
        return False

    def await_slot(self, slot: int) -> None:
        """Order the compute stream after the slot's write (a no-op once it is complete)."""
        event = self._pending.get(slot)
        if event is not None:
            self._backend.compute_wait(event)


SlotTransfer = InlineTransfer | StreamTransfer


def transfer_for(device: torch.device) -> SlotTransfer:
    """The copy path of a device: the side stream on CUDA, inline anywhere else."""
    return StreamTransfer(CudaBackend(device)) if device.type == "cuda" else InlineTransfer()


class TransferredSlots:
    """A model's ``SlotBuffers`` whose writes and clears go through a ``SlotTransfer``."""

    def __init__(self, buffers: SlotBuffers, transfer: SlotTransfer) -> None:
        self.buffers, self.transfer = buffers, transfer
        self.num_slots = buffers.num_slots

    def write_slot(self, slot: int, weights: LoraWeights) -> None:
        self.transfer.run(slot, lambda: self.buffers.write_slot(slot, weights))

    def clear_slot(self, slot: int) -> None:
        self.transfer.run(slot, lambda: self.buffers.clear_slot(slot))
