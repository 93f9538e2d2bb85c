"""The replica's generation engine: continuous batching over many adapters on one base model.

One thread (the *loop*) owns the model, the KV cache and the SlotManager; callers on any asyncio
loop talk to it through a thread-safe inbox and get their tokens back through their own loop.
Each loop iteration admits waiting requests whose adapter is ready, prefills up to
``prefill_chunk`` prompt tokens, then runs one decode step for every running sequence, whatever
adapters they use. Adapter files are fetched and validated by worker threads, so a cold adapter
never stalls the rows already decoding. The engine knows nothing of Ray.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from openlora_ray.engine.config import EngineConfig
from openlora_ray.engine.detokenize import IncrementalText
from openlora_ray.engine.prompts import Prompt, encode_prompt
from openlora_ray.engine.request import FinishReason, GenerationRequest, SamplingParams, StreamOutput
from openlora_ray.engine.sampling import sample_next
from openlora_ray.errors import AdapterNotFoundError, CapacityError, InvalidAdapterError, InvalidRequestError
from openlora_ray.lora.ops import NO_ADAPTER
from openlora_ray.lora.slots import SlotManager
from openlora_ray.lora.weights import LoraWeights, RawLora, read_lora, to_weights
from openlora_ray.model.loader import load_multi_lora_model, resolve_dtype

log = logging.getLogger(__name__)

AdapterResolver = Callable[[str], Path]  # adapter id -> local folder (blocking; runs in a worker)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for routing and metrics, published by the loop after every step."""

    resident_adapters: tuple[str, ...] = ()
    host_adapters: tuple[str, ...] = ()
    loading_adapters: tuple[str, ...] = ()
    pinned_adapters: tuple[str, ...] = ()  # kept resident by an operator
    loads_by_tier: dict[str, int] = field(default_factory=dict)  # slot hits and loads, by source
    evictions: int = 0
    num_slots: int = 0
    free_slots: int = 0
    free_kv_rows: int = 0
    free_kv_tokens: int = 0
    free_device_bytes: int = 0
    queue_depth: int = 0
    running: int = 0
    tokens_per_s: float = 0.0
    steps: int = 0


@dataclass(eq=False)
class _Seq:
    req: GenerationRequest
    emit: Callable[[StreamOutput], None]
    text: IncrementalText
    generator: torch.Generator | None
    submitted: float = field(default_factory=time.monotonic)
    slot: int = NO_ADAPTER
    row: int | None = None
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def prefill_done(self) -> bool:
        return self.prefilled == len(self.req.prompt_ids)


class Engine:
    def __init__(self, config: EngineConfig, adapter_resolver: AdapterResolver | None = None) -> None:
        """Start the loop thread and wait until it has loaded the model (its errors raise here)."""
        self.config = config
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)
        self.device = torch.device(config.device)
        self.tokenizer = _load_tokenizer(config.model_path)
        self._resolver = adapter_resolver
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._loader = ThreadPoolExecutor(config.load_workers, thread_name_prefix="adapter-load")
        self._loading: dict[str, Future[RawLora]] = {}
        self._ready: dict[str, LoraWeights] = {}
        self._operator_pins: set[str] = set()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        # A min-heap: the lowest free row is taken first, so the decoding rows tend to form one
        # contiguous block that the model reads in place (see MultiLoraLlama.forward).
        self._free_rows = list(range(config.max_running))
        self._pending = 0  # submitted and not finished; guarded by _lock
        self._lock = threading.Lock()
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self._steps = 0
        self._stop = threading.Event()
        self._draining = False
        self._heartbeat = time.monotonic()
        self.stats = EngineStats()
        # The model is built on the loop thread, which then runs every torch op of consequence:
        # see RawLora for why torch work in a second thread would slow every step.
        started: Future[None] = Future()
        self._thread = threading.Thread(target=self._main, args=(started,), name="engine-loop", daemon=True)
        self._thread.start()
        started.result()

    def _setup(self) -> None:
        dtype = resolve_dtype(self.config.dtype, self.device)
        self.model = load_multi_lora_model(self.config.model_path, self.config.num_slots, self.config.max_rank, dtype, self.device)
        self.slots = SlotManager(self.model, self.config.host_cache_bytes)
        self.cache = self.model.new_kv_cache(self.config.max_running, self.config.max_seq_len)
        self.eos_ids = _eos_ids(self.model.config, self.tokenizer)
        self._static_bytes = sum(t.nbytes for t in itertools.chain(self.model.parameters(), self.model.buffers())) + self.cache.nbytes

    # ------------------------------------------------------------------ public API (any thread)
    def tokenize(self, prompt: Prompt) -> list[int]:
        """Token ids from text, chat messages (through the chat template) or ids as given."""
        return encode_prompt(self.tokenizer, self.model.config.vocab_size, prompt)

    def make_request(self, prompt: Prompt, adapter_id: str | None = None, params: SamplingParams | None = None, request_id: str | None = None) -> GenerationRequest:
        return GenerationRequest(request_id or uuid.uuid4().hex, adapter_id, tuple(self.tokenize(prompt)), params or SamplingParams())

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamOutput]:
        """Stream the request's increments; raises the domain error if it fails.

        Leaving the iteration early (a client disconnect, ``break``, cancellation) aborts the
        request: its KV-cache row and slot pin are freed on the loop's next iteration.
        """
        self._check_admissible(request)
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[StreamOutput] = asyncio.Queue()
        gen = torch.Generator().manual_seed(request.params.seed) if request.params.seed is not None else None
        seq = _Seq(request, lambda o: loop.call_soon_threadsafe(out.put_nowait, o), IncrementalText(self.tokenizer, tuple(request.params.stop)), gen)
        with self._lock:
            if self._pending >= self.config.max_running + self.config.max_queue:
                raise CapacityError(f"engine queue is full ({self._pending} requests); retry shortly")
            self._pending += 1
        self._inbox.put(("submit", seq))
        finished = False
        try:
            while True:
                item = await out.get()
                if item.finish_reason is not None:
                    finished = True
                if item.finish_reason == "error":
                    raise item.error
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the loop thread between steps (it owns the slots) and await its result."""
        fut: Future[Any] = Future()
        self._inbox.put(("call", (fn, fut)))
        return await asyncio.wrap_future(fut)

    async def prefetch(self, adapter_id: str, pin: bool = False) -> int:
        """Load an adapter into a slot ahead of traffic (read off the loop); ``pin`` keeps it there."""
        if adapter_id not in self.stats.resident_adapters:
            raw = await asyncio.to_thread(self._read_adapter, adapter_id)
            await self.call(lambda: self.slots.load(to_weights(raw, self.model.dtype)))
        return await self.call(lambda: self._pin(adapter_id) if pin else self.slots.slot_of(adapter_id))

    async def unpin(self, adapter_id: str) -> None:
        """Drop an operator pin (from ``prefetch(pin=True)``); the adapter becomes evictable."""
        await self.call(lambda: self._unpin(adapter_id))

    async def evict(self, adapter_id: str) -> None:
        """Remove an adapter from its slot and the host tier; refused while requests use it."""
        await self.call(lambda: self.slots.unload(adapter_id))

    def _pin(self, adapter_id: str) -> int:
        if adapter_id in self._operator_pins:
            return self.slots.slot_of(adapter_id)
        slot = self.slots.acquire(adapter_id, lambda aid: to_weights(self._read_adapter(aid), self.model.dtype))
        self._operator_pins.add(adapter_id)
        return slot

    def _unpin(self, adapter_id: str) -> None:
        if adapter_id in self._operator_pins:
            self._operator_pins.discard(adapter_id)
            self.slots.release(adapter_id)

    def healthy(self, max_stall_s: float = 30.0) -> bool:
        """False when the loop thread died or has not finished an iteration for ``max_stall_s``."""
        return self._thread.is_alive() and time.monotonic() - self._heartbeat < max_stall_s

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Stop taking requests, let queued and running ones finish (up to the timeout), then stop."""
        self._draining = True
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline and self._pending > 0 and self._thread.is_alive():
            time.sleep(0.02)
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout=10)
        self._loader.shutdown(wait=False, cancel_futures=True)

    # ----------------------------------------------------------------------------- the loop
    def _main(self, started: Future[None]) -> None:
        try:
            self._setup()
        except BaseException as e:  # handed to the constructor, which re-raises it
            started.set_exception(e)
            return
        self._publish_stats()
        started.set_result(None)
        self._run()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._heartbeat = time.monotonic()
            self._drain_inbox(block=not self._running)
            try:
                self._collect_loads()
                self._admit()
                self._prefill()
                self._decode()
            except Exception as e:  # a failed forward must not strand the requests in flight
                log.exception("engine step failed; failing %d running request(s)", len(self._running))
                for seq in list(self._running):
                    self._finish(seq, "error", e)
            self._publish_stats()
        for seq in list(self._waiting) + list(self._running):
            self._finish(seq, "abort")
        self._publish_stats()

    def _drain_inbox(self, block: bool) -> None:
        """Apply submits and aborts; when idle, wait briefly for one (wakes also come here)."""
        try:
            msg = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                kind, arg = msg
                if kind == "submit":
                    self._waiting.append(arg)
                elif kind == "call":
                    fn, fut = arg
                    try:
                        fut.set_result(fn())
                    except Exception as e:  # handed to the caller, who awaits the future
                        fut.set_exception(e)
                elif kind == "abort":
                    for seq in itertools.chain(self._waiting, self._running):
                        if seq.req.request_id == arg:
                            self._finish(seq, "abort")
                            break
                msg = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _collect_loads(self) -> None:
        for adapter_id, fut in list(self._loading.items()):
            if not fut.done():
                continue
            del self._loading[adapter_id]
            err = fut.exception()
            if err is None:
                try:
                    self._ready[adapter_id] = to_weights(fut.result(), self.model.dtype)
                    continue
                except InvalidAdapterError as e:
                    err = e
            log.warning("adapter %s failed to load: %s", adapter_id, err)
            for seq in [s for s in self._waiting if s.req.adapter_id == adapter_id]:
                self._finish(seq, "error", err)

    def _admit(self) -> None:
        still: deque[_Seq] = deque()
        while self._waiting:
            seq = self._waiting.popleft()
            aid = seq.req.adapter_id
            if not self._free_rows:
                still.append(seq)
                continue
            if aid is not None:
                if self.slots.slot_of(aid) is None and aid not in self.slots.host and aid not in self._ready:
                    self._start_load(aid)
                    still.append(seq)
                    continue
                try:
                    seq.slot = self.slots.acquire(aid, self._ready.pop)
                except CapacityError:  # every slot pinned by running rows: wait for one to finish
                    still.append(seq)
                    continue
            seq.row = heapq.heappop(self._free_rows)
            self._running.append(seq)
        self._waiting = still
        needed = {s.req.adapter_id for s in still}
        for aid in [a for a in self._ready if a not in needed]:  # nobody waits any more
            self.slots.host.put(self._ready.pop(aid))

    def _start_load(self, adapter_id: str) -> None:
        if adapter_id in self._loading:
            return
        fut = self._loader.submit(self._read_adapter, adapter_id)
        fut.add_done_callback(lambda _: self._inbox.put(("wake", None)))
        self._loading[adapter_id] = fut

    def _read_adapter(self, adapter_id: str) -> RawLora:
        """Worker thread: resolve to a local folder, validate, read (``to_weights`` follows on the loop)."""
        if self._resolver is None:
            raise AdapterNotFoundError(adapter_id, "this engine (no adapter store configured)")
        path = self._resolver(adapter_id)
        return read_lora(adapter_id, path, self.model.dims, self.model.max_rank)

    @torch.inference_mode()
    def _prefill(self) -> None:
        budget = self.config.prefill_chunk
        for seq in list(self._running):
            if budget <= 0:
                break
            if seq.prefill_done:
                continue
            prompt = seq.req.prompt_ids
            n = min(budget, len(prompt) - seq.prefilled)
            start = seq.prefilled
            tokens = torch.tensor([prompt[start : start + n]], device=self.device)  # (1, n)
            positions = torch.arange(start, start + n, device=self.device)[None]  # (1, n)
            logits = self.model(tokens, positions, self.model.lora_batch([seq.slot]), self.cache, slice(seq.row, seq.row + 1), logits_at=torch.tensor([n - 1], device=self.device))
            seq.prefilled += n
            budget -= n
            if seq.prefill_done:
                self._accept(seq, sample_next(logits, [seq.req.params], [seq.generator], [self._seen(seq)])[0])

    @torch.inference_mode()
    def _decode(self) -> None:
        seqs = sorted((s for s in self._running if s.prefill_done and s.generated), key=lambda s: s.row)
        if not seqs:
            return
        dev = self.device
        tokens = torch.tensor([[s.generated[-1]] for s in seqs], device=dev)  # (B, 1)
        positions = torch.tensor([[len(s.req.prompt_ids) + len(s.generated) - 1] for s in seqs], device=dev)  # (B, 1)
        first, last = seqs[0].row, seqs[-1].row
        rows = slice(first, last + 1) if last - first + 1 == len(seqs) else torch.tensor([s.row for s in seqs], device=dev)
        logits = self.model(tokens, positions, self.model.lora_batch([s.slot for s in seqs]), self.cache, rows, logits_at=torch.zeros(len(seqs), dtype=torch.long, device=dev))
        chosen = sample_next(logits, [s.req.params for s in seqs], [s.generator for s in seqs], [self._seen(s) for s in seqs])
        for seq, tok in zip(seqs, chosen):
            self._accept(seq, tok)
        self._recent.append((time.monotonic(), len(seqs)))

    def _seen(self, seq: _Seq) -> torch.Tensor:
        if seq.req.params.repetition_penalty == 1.0:
            return torch.empty(0, dtype=torch.long)
        return torch.tensor(seq.req.prompt_ids + tuple(seq.generated), dtype=torch.long)

    def _accept(self, seq: _Seq, token: int) -> None:
        """Record a sampled token, stream it, and finish the sequence if it should stop."""
        now = time.monotonic()
        seq.first_token_at = seq.first_token_at or now
        seq.last_token_at = now
        seq.generated.append(token)
        p = seq.req.params
        if token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos):
            self._finish(seq, "stop")
            return
        text, stopped = seq.text.add(token)
        if stopped:
            self._finish(seq, "stop", text=text)
        elif len(seq.generated) >= p.max_tokens:
            self._finish(seq, "length", text=text + seq.text.flush())
        else:
            seq.emit(StreamOutput(seq.req.request_id, text, (token,)))

    def _finish(self, seq: _Seq, reason: FinishReason, error: Exception | None = None, text: str | None = None) -> None:
        if seq in self._waiting:
            self._waiting.remove(seq)
        if seq in self._running:
            self._running.remove(seq)
            heapq.heappush(self._free_rows, seq.row)
            if seq.req.adapter_id is not None:
                self.slots.release(seq.req.adapter_id)
        with self._lock:
            self._pending -= 1
        if text is None:
            text = seq.text.flush() if reason == "stop" else ""
        n = len(seq.generated)
        ttft = seq.first_token_at - seq.submitted if seq.first_token_at else None
        per_token = (seq.last_token_at - seq.first_token_at) / (n - 1) if n > 1 else None
        seq.emit(StreamOutput(seq.req.request_id, text, tuple(seq.generated[-1:]) if reason in ("stop", "length") else (), reason, len(seq.req.prompt_ids), n, ttft, per_token, error))

    def _publish_stats(self) -> None:
        self._steps += 1
        now = time.monotonic()
        while self._recent and now - self._recent[0][0] > 5.0:
            self._recent.popleft()
        span = now - self._recent[0][0] if len(self._recent) > 1 else 0.0
        used_tokens = sum(len(s.req.prompt_ids) + len(s.generated) for s in self._running)
        self.stats = EngineStats(
            resident_adapters=tuple(self.slots.resident()),
            host_adapters=tuple(self.slots.host.ids()),
            loading_adapters=tuple(self._loading) + tuple(self._ready),
            pinned_adapters=tuple(sorted(self._operator_pins)),
            loads_by_tier=dict(self.slots.loads_by_tier),
            evictions=self.slots.evictions,
            num_slots=self.config.num_slots,
            free_slots=self.slots.free_slots,
            free_kv_rows=len(self._free_rows),
            free_kv_tokens=self.config.max_running * self.config.max_seq_len - used_tokens,
            free_device_bytes=self._free_device_bytes(),
            queue_depth=len(self._waiting),
            running=len(self._running),
            tokens_per_s=sum(n for _, n in self._recent) / span if span else 0.0,
            steps=self._steps,
        )

    def _free_device_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.mem_get_info(self.device)[0]
        return max(0, self.config.memory_budget_bytes - self._static_bytes - self.slots.host.nbytes)

    def _check_admissible(self, request: GenerationRequest) -> None:
        n = len(request.prompt_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty")
        limit = self.config.max_seq_len
        if n + request.params.max_tokens > limit:
            raise InvalidRequestError(
                f"prompt ({n} tokens) + max_tokens ({request.params.max_tokens}) exceeds this server's "
                f"context of {limit} tokens; shorten the prompt or lower max_tokens"
            )
        if self._draining or self._stop.is_set():
            raise CapacityError("this replica is shutting down; retry on another")


def _load_tokenizer(path: Path) -> Any:
    if not any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _eos_ids(config: Any, tokenizer: Any) -> frozenset[int]:
    eos = config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)

