"""The replica's generation engine: continuous batching over many adapters on one base model.

One thread (the *loop*) owns the model, the KV cache and the adapter slots; callers on any asyncio
loop talk to it through a thread-safe inbox and get their tokens back through their own loop. Each
loop iteration asks the ``Scheduler`` (pure bookkeeping: which sequences run, which prompt tokens
they prefill, which are preempted, which KV blocks each writes) for a plan, has the ``ModelRunner``
(every tensor) compute it, and streams what was sampled. Adapters reach their slots through the
``AdapterManager`` (files read by worker threads, so a cold adapter never stalls the rows already
decoding). The engine knows nothing of Ray.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from openlora_ray.engine.adapters import AdapterManager, AdapterResolver
from openlora_ray.engine.block_pool import BlockPool
from openlora_ray.engine.config import EngineConfig
from openlora_ray.engine.constraints import ConstraintError, TokenConstraint
from openlora_ray.engine.detokenize import IncrementalText
from openlora_ray.engine.grammar import GrammarCompiler
from openlora_ray.engine.memory import MemoryPlan, plan_memory
from openlora_ray.engine.prompt_logprobs import score_tokens
from openlora_ray.engine.prompts import Prompt, encode_prompt
from openlora_ray.engine.request import FinishReason, GenerationRequest, SamplingParams, StreamOutput, TokenLogprobs
from openlora_ray.engine.runner import DecodeRow, ModelRunner, PrefillRow
from openlora_ray.engine.sampling import RowContext, SamplingError
from openlora_ray.engine.scheduler import Chunk, Scheduler, Seq, StepPlan
from openlora_ray.errors import CapacityError, InvalidRequestError
from openlora_ray.lora.slots import SlotManager
from openlora_ray.lora.transfer import TransferredSlots, transfer_for
from openlora_ray.model.generation_config import GenerationDefaults, read_generation_defaults
from openlora_ray.model.llama import PagedKVCache
from openlora_ray.model.loader import load_multi_lora_model, resolve_dtype
from openlora_ray.model.support import UnsupportedModelError

log = logging.getLogger(__name__)

UNHEALTHY_AFTER_FAILED_STEPS = 3  # consecutive steps that failed their requests: the replica is broken


@dataclass(frozen=True)
class AdapterPrefixStats:
    prompt_tokens: int
    hit_tokens: int  # prompt tokens whose keys and values came from the prefix cache

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


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
    total_kv_blocks: int = 0
    free_kv_blocks: int = 0  # not referenced by any sequence (cached prefixes included: reclaimable)
    cached_kv_blocks: int = 0  # holding a named prefix block
    kv_block_size: int = 0
    free_device_bytes: int = 0  # free KV blocks and free slots, in bytes: room for new work
    prefix: dict[str, AdapterPrefixStats] = field(default_factory=dict)  # by adapter ("" = base model)
    preemptions: int = 0
    queue_depth: int = 0
    running: int = 0
    tokens_per_s: float = 0.0
    steps: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        prompt = sum(p.prompt_tokens for p in self.prefix.values())
        return sum(p.hit_tokens for p in self.prefix.values()) / prompt if prompt else 0.0


@dataclass(eq=False)
class _Request:
    """The loop's record of a request: the scheduler's sequence plus what streaming needs."""

    req: GenerationRequest
    seq: Seq
    emit: Callable[[StreamOutput], None]
    text: IncrementalText
    generator: torch.Generator | None = None
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    gone: bool = False  # the caller's event loop closed: nobody reads this stream any more
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # of tokens not streamed yet
    prompt_scores: list[TokenLogprobs | None] = field(default_factory=lambda: [None])  # prompt_logprobs, by position
    prompt_scores_sent: bool = False
    constraint: TokenConstraint | None = None  # the request's output grammar, advanced token by token

    def take_logprobs(self) -> tuple[TokenLogprobs, ...]:
        out, self.logprobs = tuple(self.logprobs), []
        return out

    def prompt_targets(self, start: int, length: int) -> range:
        """The prompt positions whose log probabilities a prefill chunk of positions
        ``start..start + length - 1`` yields (position p's come from p - 1's logits) and that are
        not scored yet (a preempted sequence recomputes its chunks)."""
        if self.req.params.prompt_logprobs is None:
            return range(0)
        return range(max(start + 1, len(self.prompt_scores)), min(start + length, self.seq.num_prompt - 1) + 1)

    def add_prompt_scores(self, scores: list[TokenLogprobs]) -> None:
        self.prompt_scores += scores
        if len(self.prompt_scores) == self.seq.num_prompt:
            self.seq.needs_prompt_logits = False  # recomputing it may use the prefix cache again

    def take_prompt_scores(self) -> tuple[TokenLogprobs | None, ...]:
        """The prompt's log probabilities once they are complete, on the first increment only."""
        if self.req.params.prompt_logprobs is None or self.prompt_scores_sent:
            return ()
        self.prompt_scores_sent = True
        return tuple(self.prompt_scores)

    @property
    def generated(self) -> list[int]:
        return self.seq.tokens[self.seq.num_prompt :]

    def send(self, output: StreamOutput) -> None:
        try:
            self.emit(output)
        except RuntimeError:  # the caller's loop is closed; the engine aborts the request
            self.gone = True


class Engine:
    def __init__(self, config: EngineConfig, adapter_resolver: AdapterResolver | None = None) -> None:
        """Start the loop thread and wait until it has loaded the model (its errors raise here)."""
        self.config = config
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)
        self.device = torch.device(config.device)
        self.tokenizer = _load_tokenizer(config.model_path)
        self.generation_defaults = read_generation_defaults(config.model_path)
        try:  # a value the sampler cannot use stops the engine here, not every later request
            self.with_model_defaults(SamplingParams())
        except ValidationError as e:
            raise UnsupportedModelError(f"{config.model_path}: generation_config.json's sampling defaults: {e}") from e
        self._resolver = adapter_resolver
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._requests: dict[Seq, _Request] = {}
        self._pending = 0  # submitted and not finished; guarded by _lock
        self._lock = threading.Lock()
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self._steps = 0
        self._failed_steps = 0  # consecutive
        self._stop = threading.Event()
        self._draining = False
        self._heartbeat = time.monotonic()
        self.stats = EngineStats()
        self._grammars: GrammarCompiler | None = None  # built for the first constrained request
        # The model is built on the loop thread, which then runs every torch op of consequence:
        # see RawLora for why torch work in a second thread would slow every step.
        started: Future[None] = Future()
        self._thread = threading.Thread(target=self._main, args=(started,), name="engine-loop", daemon=True)
        self._thread.start()
        started.result()

    def _setup(self) -> None:
        cfg = self.config
        dtype = resolve_dtype(cfg.dtype, self.device)
        self.model = load_multi_lora_model(
            cfg.model_path, cfg.num_slots, cfg.max_rank, dtype, self.device, max_seq_len=cfg.max_seq_len
        )
        self.memory = self._plan_memory(dtype)
        log.info("engine memory: %s", self.memory.describe(cfg.num_slots, cfg.max_rank))
        transfer = transfer_for(self.device)  # CUDA: pinned host tier, slot copies on a side stream
        self.slots = SlotManager(
            TransferredSlots(self.model, transfer),
            cfg.host_cache_bytes,
            eviction_half_life_s=cfg.slot_eviction_half_life_s,
        )
        self.runner = ModelRunner(
            self.model, num_blocks=self.memory.num_blocks, block_size=cfg.kv_block_size, cuda_graphs=cfg.cuda_graphs
        )
        self.pool = BlockPool(self.memory.num_blocks)
        self.scheduler = Scheduler(
            self.pool,
            block_size=cfg.kv_block_size,
            max_running=cfg.max_running,
            token_budget=cfg.prefill_chunk,
            watermark=max(1, self.memory.num_blocks // 100),
            prefix_cache=cfg.prefix_cache,
        )
        self.adapters = AdapterManager(
            self.slots,
            resolver=self._resolver,
            dims=self.model.dims,
            max_rank=cfg.max_rank,
            dtype=dtype,
            workers=cfg.load_workers,
            wake=lambda: self._inbox.put(("wake", None)),
            base_identity=f"base:{Path(cfg.model_path).resolve()}:{dtype}",
            recheck_s=cfg.adapter_recheck_s,
            transfer=transfer,
            rows_running=lambda: bool(self.scheduler.running),
        )
        self.eos_ids = _eos_ids(self.generation_defaults, self.tokenizer)

    def _plan_memory(self, dtype: torch.dtype) -> MemoryPlan:
        cfg = self.config
        if self.device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(self.device)[1] * cfg.gpu_memory_fraction)
        else:
            budget = cfg.memory_budget_bytes
        return plan_memory(
            budget_bytes=budget,
            model_bytes=sum(t.nbytes for t in itertools.chain(self.model.parameters(), self.model.buffers())),
            slot_bytes=self.model.bytes_per_slot(),
            block_bytes=PagedKVCache.bytes_per_block(self.model.dims, cfg.kv_block_size, dtype),
            block_size=cfg.kv_block_size,
            max_running=cfg.max_running,
            max_seq_len=cfg.max_seq_len,
            num_blocks=cfg.num_kv_blocks,
        )

    # ------------------------------------------------------------------ public API (any thread)
    def tokenize(self, prompt: Prompt) -> list[int]:
        """Token ids from text, chat messages (through the chat template) or ids as given."""
        return encode_prompt(self.tokenizer, self.model.config.vocab_size, prompt)

    def make_request(self, prompt: Prompt, adapter_id: str | None = None, params: SamplingParams | None = None, request_id: str | None = None) -> GenerationRequest:
        params = self.with_model_defaults(params or SamplingParams())
        return GenerationRequest(request_id or uuid.uuid4().hex, adapter_id, tuple(self.tokenize(prompt)), params)

    def with_model_defaults(self, params: SamplingParams) -> SamplingParams:
        """``params`` with the model's recommended sampling (generation_config.json) in the fields
        the caller did not set; fields the caller set, even to the default value, stay."""
        defaults = {
            k: v for k, v in self.generation_defaults.sampling.items()
            if k in SamplingParams.model_fields and k not in params.model_fields_set
        }
        return SamplingParams.model_validate({**defaults, **params.model_dump(exclude_unset=True)}) if defaults else params

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamOutput]:
        """Stream the request's increments; raises the domain error if it fails.

        Increments that arrived while the caller was busy come as one: a fast engine then sends
        one item per read, not one per token (each is a Ray object when the caller is remote).

        Leaving the iteration early (a client disconnect, ``break``, cancellation) aborts the
        request: its KV blocks and slot pin are freed on the loop's next iteration.
        """
        self._check_admissible(request)
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[StreamOutput] = asyncio.Queue()
        p = request.params
        prompt = list(request.prompt_ids)
        seq = Seq(
            request.request_id, request.adapter_id, prompt, len(prompt), needs_prompt_logits=p.prompt_logprobs is not None
        )
        text = IncrementalText(self.tokenizer, tuple(p.stop), p.skip_special_tokens, p.include_stop_str_in_output)
        record = _Request(request, seq, lambda o: loop.call_soon_threadsafe(out.put_nowait, o), text)
        record.constraint = self._constraint(request.params)
        with self._lock:
            if self._pending >= self.config.max_running + self.config.max_queue:
                raise CapacityError(f"engine queue is full ({self._pending} requests); retry shortly")
            self._pending += 1
        self._inbox.put(("submit", record))
        finished = False
        try:
            while True:
                item = await out.get()
                while item.finish_reason is None and not out.empty():  # a slow reader gets one merged item
                    item = _merge(item, out.get_nowait())
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

    def _constraint(self, params: SamplingParams) -> TokenConstraint | None:
        """The request's matcher, compiled on the caller's thread (a bad schema is its 400)."""
        if params.constraint is None:
            return None
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.model.config.vocab_size, self.eos_ids)
        return self._grammars.compile(params.constraint)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the loop thread between steps (it owns the slots) and await its result."""
        fut: Future[Any] = Future()
        self._inbox.put(("call", (fn, fut)))
        return await asyncio.wrap_future(fut)

    async def prefetch(self, adapter_id: str, pin: bool = False) -> int:
        """Load an adapter into a slot ahead of traffic (read off the loop); ``pin`` keeps it there.
        Always resolved and read afresh: the id may mean other content than a resident copy's."""
        raw = await asyncio.to_thread(self.adapters.read, adapter_id)
        return await self.call(lambda: self.adapters.load(raw, pin=pin))

    async def unpin(self, adapter_id: str) -> None:
        """Drop an operator pin (from ``prefetch(pin=True)``); the adapter becomes evictable."""
        await self.call(lambda: self.adapters.unpin(adapter_id))

    async def evict(self, adapter_id: str) -> None:
        """Remove an adapter from its slot and the host tier; refused while requests use it."""
        await self.call(lambda: self.adapters.evict(adapter_id))

    def healthy(self, max_stall_s: float = 30.0) -> bool:
        """False when the loop thread died, has not finished an iteration for ``max_stall_s``, or
        its last steps all failed (a broken device: Serve should replace the replica)."""
        return (
            self._thread.is_alive()
            and time.monotonic() - self._heartbeat < max_stall_s
            and self._failed_steps < UNHEALTHY_AFTER_FAILED_STEPS
        )

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Stop taking requests, let queued and running ones finish (up to the timeout), then stop."""
        self._draining = True
        deadline = time.monotonic() + drain_timeout_s
        while time.monotonic() < deadline and self._pending > 0 and self._thread.is_alive():
            time.sleep(0.02)
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout=10)
        if hasattr(self, "adapters"):
            self.adapters.shutdown()

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
            self._drain_inbox(block=not self.scheduler.running)
            self._step()
            self._publish_stats()
        for record in list(self._requests.values()):
            self._finish(record, "abort")
        self._publish_stats()

    def _step(self) -> None:
        for adapter_id, err in self.adapters.collect():
            for record in [r for r in self._requests.values() if r.req.adapter_id == adapter_id and r.seq in self.scheduler.waiting]:
                self._finish(record, "error", err)
        plan = self.scheduler.schedule(self.adapters)
        for seq, err in plan.failed:
            self._finish(self._requests[seq], "error", err)
        if plan.preempted:
            log.debug("preempted %d sequence(s) for KV blocks", len(plan.preempted))
        if not plan.empty:
            try:
                sampled = self._compute(plan)
            except Exception as e:  # a failed forward fails the requests it computed, nothing else
                self._failed_steps += 1
                log.exception("engine step failed; failing its %d request(s)", len(plan.prefill) + len(plan.decode))
                for seq in {c.seq for c in plan.prefill} | set(plan.decode):
                    self._finish(self._requests[seq], "error", e)
                return
            self._failed_steps = 0
            self.scheduler.commit(plan)
            for seq, token in sampled:
                self._accept(self._requests[seq], token)
        self.adapters.prepare(self.scheduler.waiting, depth=self.config.num_slots)

    def _compute(self, plan: StepPlan) -> list[tuple[Seq, tuple[int, TokenLogprobs] | SamplingError]]:
        """Run the plan's forwards; the token sampled for each sequence that reached its end."""
        slot = self.adapters.slot
        done: list[tuple[Seq, torch.Tensor]] = []
        mixed: list[Chunk] = []
        for chunk in plan.prefill:
            seq = chunk.seq
            record = self._requests[seq]
            targets = record.prompt_targets(chunk.start, chunk.length)
            if self.runner.mixes and not targets:
                mixed.append(chunk)
                continue
            logits = self.runner.prefill(
                seq.tokens[chunk.start : chunk.start + chunk.length],
                start=chunk.start,
                blocks=seq.blocks,
                all_logits=bool(targets),
                slot=slot(seq),
            )
            if targets:  # logits of every position of the chunk: score the prompt's tokens
                rows = logits[targets.start - 1 - chunk.start : targets.stop - 1 - chunk.start]
                k = record.req.params.prompt_logprobs or 0
                record.add_prompt_scores(score_tokens(rows, seq.tokens[targets.start : targets.stop], k))
                logits = logits[-1]
            if chunk.sample:
                done.append((seq, logits[None]))
        if plan.decode or mixed:
            # One adapter's rows side by side: the LoRA op then reads them in place, not gathered.
            decode = sorted(plan.decode, key=slot)
            rows = [DecodeRow(s.tokens[-1], len(s.tokens) - 1, s.blocks, slot(s)) for s in decode]
            pieces = [
                PrefillRow(c.seq.tokens[c.start : c.start + c.length], c.start, c.seq.blocks, slot(c.seq), c.sample)
                for c in mixed
            ]
            logits = self.runner.step(rows, pieces) if pieces else self.runner.decode(rows)
            sampled = decode + [c.seq for c in mixed if c.sample]
            done += [(seq, logits[i : i + 1]) for i, seq in enumerate(sampled)]
            if decode:
                self._recent.append((time.monotonic(), len(rows)))
        if not done:
            return []
        seqs = [s for s, _ in done]
        records = [self._requests[s] for s in seqs]
        tokens = self.runner.sample(
            torch.cat([lg for _, lg in done]),
            [
                RowContext(r.req.params, self._generator(r), r.req.prompt_ids, r.generated, self.eos_ids, r.constraint)
                for r in records
            ],
        )
        return list(zip(seqs, tokens))

    def _generator(self, record: _Request) -> torch.Generator | None:
        seed = record.req.params.seed
        if seed is not None and record.generator is None:
            record.generator = self.runner.new_generator(seed)
        return record.generator

    def _drain_inbox(self, block: bool) -> None:
        """Apply submits and aborts; when idle, wait briefly for one (wakes also come here)."""
        try:
            msg = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            while True:
                kind, arg = msg
                if kind == "submit":
                    self._requests[arg.seq] = arg
                    self.scheduler.add(arg.seq)
                elif kind == "call":
                    fn, fut = arg
                    try:
                        fut.set_result(fn())
                    except Exception as e:  # handed to the caller, who awaits the future
                        fut.set_exception(e)
                elif kind == "abort":
                    for record in list(self._requests.values()):
                        if record.req.request_id == arg:
                            self._finish(record, "abort")
                            break
                msg = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _accept(self, record: _Request, sampled: tuple[int, TokenLogprobs] | SamplingError) -> None:
        """Record a sampled token, stream it, and finish the sequence if it should stop."""
        if isinstance(sampled, SamplingError):
            self._finish(record, "error", InvalidRequestError(str(sampled)))
            return
        token, logprobs = sampled
        if record.req.params.max_tokens == 0:  # only the prompt was asked for (prompt_logprobs)
            self._finish(record, "length")
            return
        if record.req.params.logprobs is not None:
            record.logprobs.append(logprobs)
        now = time.monotonic()
        record.first_token_at = record.first_token_at or now
        record.last_token_at = now
        record.seq.tokens.append(token)
        if record.constraint is not None and not record.constraint.finished:
            try:
                record.constraint.accept(token)
            except ConstraintError as e:  # only this request fails
                self._finish(record, "error", InvalidRequestError(str(e)))
                return
        p = record.req.params
        if token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos):
            self._finish(record, "stop")
            return
        text, stopped = record.text.add(token)
        if stopped:
            self._finish(record, "stop", text=text)
        elif len(record.generated) >= p.max_tokens:
            self._finish(record, "length", text=text + record.text.flush())
        else:
            record.send(
                StreamOutput(
                    record.req.request_id, text, (token,),
                    logprobs=record.take_logprobs(), prompt_logprobs=record.take_prompt_scores(),
                )
            )
            if record.gone:
                self._finish(record, "abort")

    def _finish(self, record: _Request, reason: FinishReason, error: Exception | None = None, text: str | None = None) -> None:
        if self._requests.pop(record.seq, None) is None:
            return
        self.scheduler.finish(record.seq, self.adapters)
        with self._lock:
            self._pending -= 1
        if text is None:
            text = record.text.flush() if reason == "stop" else ""
        generated = record.generated
        n = len(generated)
        ttft = record.first_token_at - record.submitted if record.first_token_at else None
        per_token = (record.last_token_at - record.first_token_at) / (n - 1) if n > 1 else None
        last = tuple(generated[-1:]) if reason in ("stop", "length") else ()
        record.send(
            StreamOutput(
                record.req.request_id, text, last, reason, record.seq.num_prompt, n, ttft, per_token, error,
                logprobs=record.take_logprobs() if last else (),
                prompt_logprobs=record.take_prompt_scores() if reason in ("stop", "length") else (),
            )
        )

    def _publish_stats(self) -> None:
        self._steps += 1
        now = time.monotonic()
        while self._recent and now - self._recent[0][0] > 5.0:
            self._recent.popleft()
        span = now - self._recent[0][0] if len(self._recent) > 1 else 0.0
        sched, plan = self.scheduler, self.memory
        self.stats = EngineStats(
            resident_adapters=tuple(self.slots.resident()),
            host_adapters=tuple(self.slots.host.ids()),
            loading_adapters=self.adapters.loading,
            pinned_adapters=tuple(sorted(self.adapters.operator_pins)),
            loads_by_tier=dict(self.slots.loads_by_tier),
            evictions=self.slots.evictions,
            num_slots=self.config.num_slots,
            free_slots=self.slots.free_slots,
            total_kv_blocks=plan.num_blocks,
            free_kv_blocks=self.pool.num_free,
            cached_kv_blocks=self.pool.num_cached,
            kv_block_size=plan.block_size,
            free_device_bytes=self.pool.num_free * plan.block_bytes + self.slots.free_slots * plan.slot_bytes,
            prefix={aid or "": AdapterPrefixStats(p.prompt_tokens, p.hit_tokens) for aid, p in sched.prefix.items()},
            preemptions=sched.preemptions,
            queue_depth=len(sched.waiting),
            running=len(sched.running),
            tokens_per_s=sum(n for _, n in self._recent) / span if span else 0.0,
            steps=self._steps,
        )

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
        vocab = self.model.config.vocab_size
        outside = [t for t in (*request.params.logit_bias, *request.params.stop_token_ids) if not 0 <= t < vocab]
        if outside:
            raise InvalidRequestError(f"token ids {outside[:5]} in logit_bias / stop_token_ids are outside the vocabulary [0, {vocab})")
        if self._draining or self._stop.is_set():
            raise CapacityError("this replica is shutting down; retry on another")


def _merge(a: StreamOutput, b: StreamOutput) -> StreamOutput:
    """Two consecutive increments of one request as one (``b``'s finish fields win)."""
    return dataclasses.replace(
        b,
        text=a.text + b.text,
        token_ids=a.token_ids + b.token_ids,
        logprobs=a.logprobs + b.logprobs,
        prompt_logprobs=a.prompt_logprobs + b.prompt_logprobs,
    )


def _load_tokenizer(path: Path) -> Any:
    if not any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _eos_ids(defaults: GenerationDefaults, tokenizer: Any) -> frozenset[int]:
    """config.json's and generation_config.json's EOS ids (a list for Llama 3 Instruct) and the tokenizer's."""
    ids = set(defaults.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
