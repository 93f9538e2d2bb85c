"""Host tier -> slot copies: inline on CPU, on a side stream with an event on CUDA.

The CUDA path's ordering is checked here through a fake ``StreamBackend`` (events that complete
when the test says so); ``make gpu-check`` runs the real one, pinned memory and an overlapped
decode included.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from openlora_ray.engine.adapters import AdapterManager
from openlora_ray.engine.scheduler import Seq
from openlora_ray.lora.slots import SlotManager
from openlora_ray.lora.transfer import InlineTransfer, StreamTransfer, TransferredSlots, transfer_for
from openlora_ray.lora.weights import load_lora_weights
from openlora_ray.model.loader import load_multi_lora_model


class FakeBackend:
    """Streams as names, events as flags the test sets; pinning as a recorded copy."""

    def __init__(self) -> None:
        self.current = "compute"
        self.calls: list[tuple[str, object]] = []
        self.events: list[dict] = []
        self.pinned: set[int] = set()

    def new_stream(self) -> str:
        return "side"

    @contextmanager
    def on_stream(self, stream: str):
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    def wait_compute(self, stream: str) -> None:
        self.calls.append(("wait_compute", stream))

    def record(self, stream: str) -> dict:
        event = {"done": False, "stream": stream}
        self.events.append(event)
        self.calls.append(("record", stream))
        return event

    def done(self, event: dict) -> bool:
        return event["done"]

    def compute_wait(self, event: dict) -> None:
        self.calls.append(("compute_wait", event))

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        copy = tensor.clone()
        self.pinned.add(copy.data_ptr())
        return copy


class StreamRecorder:
    """The model's slot buffers, noting which stream each write ran on."""

    def __init__(self, model, backend: FakeBackend) -> None:
        self.model, self.backend = model, backend
        self.num_slots = model.num_slots
        self.streams: list[str] = []
        self.written: list = []

    def write_slot(self, slot, weights) -> None:
        self.streams.append(self.backend.current)
        self.written.append(weights)
        self.model.write_slot(slot, weights)

    def clear_slot(self, slot) -> None:
        self.streams.append(self.backend.current)
        self.model.clear_slot(slot)


def test_cpu_keeps_pageable_memory_and_writes_inline(tiny_model_dir, make_adapter):
    transfer = transfer_for(torch.device("cpu"))
    assert isinstance(transfer, InlineTransfer)
    model = load_multi_lora_model(tiny_model_dir, num_slots=2, max_rank=8, dtype=torch.float32)
    weights = load_lora_weights("a", make_adapter("xfer-a", r=8, seed=71), model.dims, 8, torch.float32)
    assert transfer.stage(weights) is weights  # no copy, no pinning on CPU
    TransferredSlots(model, transfer).write_slot(1, weights)
    assert transfer.ready(1)
    a, _ = weights.modules[(0, "q_proj")]
    torch.testing.assert_close(model.layers[0].qkv.lora_a[1, 0, :8], a, rtol=0, atol=0)


def test_cuda_path_pins_writes_on_a_side_stream_after_the_compute_stream_and_records_an_event(
    tiny_model_dir, make_adapter
):
    backend = FakeBackend()
    transfer = StreamTransfer(backend)
    model = load_multi_lora_model(tiny_model_dir, num_slots=2, max_rank=8, dtype=torch.float32)
    recorder = StreamRecorder(model, backend)
    weights = load_lora_weights("a", make_adapter("xfer-a", r=8, seed=71), model.dims, 8, torch.float32)
    staged = transfer.stage(weights)
    assert all(a.data_ptr() in backend.pinned and b.data_ptr() in backend.pinned for a, b in staged.modules.values())
    assert staged.digest == weights.digest and staged.nbytes == weights.nbytes
    TransferredSlots(recorder, transfer).write_slot(0, staged)
    assert recorder.streams == ["side"]
    assert backend.calls == [("wait_compute", "side"), ("record", "side")]  # after the queued step, then marked
    assert not transfer.ready(0) and transfer.ready(1)  # slot 1 was never written
    transfer.await_slot(0)
    assert backend.calls[-1] == ("compute_wait", backend.events[0])
    backend.events[0]["done"] = True
    assert transfer.ready(0)
    calls = len(backend.calls)
    transfer.await_slot(0)  # complete: nothing left to wait for
    assert len(backend.calls) == calls


def _manager(model, backend: FakeBackend, folders: dict, running: list[bool]) -> tuple[AdapterManager, StreamRecorder]:
    transfer = StreamTransfer(backend)
    recorder = StreamRecorder(model, backend)
    slots = SlotManager(TransferredSlots(recorder, transfer), host_cache_bytes=10**9)
    manager = AdapterManager(
        slots,
        resolver=folders.__getitem__,
        dims=model.dims,
        max_rank=8,
        dtype=torch.float32,
        workers=1,
        wake=lambda: None,
        base_identity="base",
        transfer=transfer,
        rows_running=lambda: running[0],
    )
    return manager, recorder


def _until_written(manager: AdapterManager, recorder: StreamRecorder, seq: Seq) -> str | None:
    """Drive resolve and read (worker threads) until the adapter's slot write has been queued."""
    deadline = time.monotonic() + 30
    while not recorder.streams:
        assert time.monotonic() < deadline, "adapter never reached a slot"
        manager.collect()
        result = manager.acquire(seq)
        time.sleep(0.01)
    return result


def test_a_row_waits_for_its_slot_copy_while_others_decode_and_never_stalls_them(tiny_model_dir, make_adapter):
    backend = FakeBackend()
    model = load_multi_lora_model(tiny_model_dir, num_slots=2, max_rank=8, dtype=torch.float32)
    running = [True]
    manager, recorder = _manager(model, backend, {"a": make_adapter("xfer-a", r=8, seed=71)}, running)
    seq = Seq("s1", "a", [1, 2, 3], 3)
    try:
        assert _until_written(manager, recorder, seq) is None  # copy in flight, rows running: not admitted
        assert recorder.streams == ["side"]
        # what was copied came from pinned memory (staged when the read was converted)
        assert all(a.data_ptr() in backend.pinned for a, _ in recorder.written[0].modules.values())
        assert manager.acquire(seq) is None and manager.slots.pins(manager.slots.keys_of("a")[0]) == 0
        assert not any(name == "compute_wait" for name, _ in backend.calls)  # the running step waits for nothing
        backend.events[-1]["done"] = True
        identity = manager.acquire(seq)
        assert identity is not None and identity.startswith("lora:")
        assert recorder.streams == ["side"]  # written once, not again
        assert not any(name == "compute_wait" for name, _ in backend.calls)  # complete: no wait at all
    finally:
        manager.shutdown()


def test_with_nothing_running_a_row_is_admitted_at_once_behind_a_device_side_wait(tiny_model_dir, make_adapter):
    backend = FakeBackend()
    model = load_multi_lora_model(tiny_model_dir, num_slots=2, max_rank=8, dtype=torch.float32)
    manager, recorder = _manager(model, backend, {"a": make_adapter("xfer-a", r=8, seed=71)}, [False])
    seq = Seq("s1", "a", [1, 2, 3], 3)
    try:
        identity = _until_written(manager, recorder, seq)
        assert identity is not None  # no row to stall: admitted while the copy runs
        assert backend.calls[-1] == ("compute_wait", backend.events[-1])  # its forward queues behind the copy
        reference = load_multi_lora_model(tiny_model_dir, num_slots=2, max_rank=8, dtype=torch.float32)
        reference.write_slot(
            0, load_lora_weights("a", make_adapter("xfer-a", r=8, seed=71), model.dims, 8, torch.float32)
        )
        for ours, ref in zip(model.layers, reference.layers):  # the slot holds what an inline write gives
            for name, group in ours.groups.items():
                torch.testing.assert_close(group.lora_a, ref.groups[name].lora_a, rtol=0, atol=0)
                torch.testing.assert_close(group.lora_b, ref.groups[name].lora_b, rtol=0, atol=0)
    finally:
        manager.shutdown()
