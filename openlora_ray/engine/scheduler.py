"""What runs in the next engine step: pure bookkeeping over sequences and KV blocks (no torch).

Every sequence is a list of tokens (prompt, then what was generated) of which ``num_computed`` have
keys and values in the cache. A step computes the rest in pieces: a sequence with one token left
is a *decode row* (its last sampled token; all decode rows run as one batch), one with more is
*prefilled* in chunks under a per-step token budget; a piece that reaches the last known token
samples the next one. There are no phases: a preempted or prefix-hit sequence is just one whose
``num_computed`` is lower or higher than its length says (vLLM v1 schedules the same way; see
shared notes ``engine-references.md``).

Memory. Blocks are taken as tokens are written (``BlockPool``). A waiting sequence is admitted
when its adapter is in a slot (``AdapterGate``) and the blocks its known tokens still need, after
prefix-cache hits, leave ``watermark`` blocks free: the reserve that lets running sequences grow
for a while. When a decode row needs a block and none is free, the youngest running sequence is
preempted: its blocks are freed (full ones stay in the prefix cache, so its recompute usually hits
them), it goes back to the head of the queue and is recomputed later from its tokens, which it
keeps, so its stream pauses and resumes without losing or repeating a token. Youngest first,
because it has the least work to redo and the oldest requests keep their latency.

Admission is first come, first served for memory (a head that does not fit stops the scan, so a
long prompt is not starved by short ones) but not for adapters: a request whose adapter is still
loading, or for which every slot is pinned, is skipped and the scan goes on. Nor for a prefix
being computed: a request whose next uncached block a running sequence is prefilling right now
(OpenAI's ``n`` choices, sent together; the same system prompt twice) waits until that block is
in the cache and then hits it, instead of computing the same keys and values beside it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from openlora_ray.engine.block_pool import BlockHash, BlockPool, extend_block_hashes


@dataclass(eq=False)
class Seq:
    """One request as the scheduler sees it: its tokens and where their keys and values live."""

    seq_id: str
    adapter_id: str | None
    tokens: list[int]  # the prompt, then every generated token
    num_prompt: int
    identity: str | None = None  # KV identity, set when its adapter is acquired (see block_pool)
    num_computed: int = 0  # tokens whose keys and values are in ``blocks``
    blocks: list[int] = field(default_factory=list)  # block table: block i holds tokens [i*bs, (i+1)*bs)
    hashes: list[BlockHash] = field(default_factory=list)  # of full blocks of ``tokens`` under ``identity``
    num_named: int = 0  # leading blocks already registered in the prefix cache
    preemptions: int = 0
    admitted_once: bool = False
    needs_prompt_logits: bool = False  # no prefix-cache hits: every prompt position's logits are needed

    @property
    def uncomputed(self) -> int:
        return len(self.tokens) - self.num_computed


class AdapterGate(Protocol):
    """The engine's side of admission: adapter slots, which the scheduler does not own."""

    def acquire(self, seq: Seq) -> str | None:
        """Pin ``seq``'s adapter in a slot; the KV identity it computes under, or None to wait.

        May raise: the sequence then fails alone (``StepPlan.failed``).
        """

    def release(self, seq: Seq) -> None:
        """Drop the pin ``acquire`` took."""


@dataclass(frozen=True)
class Chunk:
    """Compute ``seq.tokens[start:start + length]``; ``sample``: it ends at the last known token."""

    seq: Seq
    start: int
    length: int
    sample: bool


@dataclass(frozen=True)
class StepPlan:
    prefill: tuple[Chunk, ...] = ()  # one forward each
    decode: tuple[Seq, ...] = ()  # one batched forward, one token each, all sampled
    preempted: tuple[Seq, ...] = ()
    failed: tuple[tuple[Seq, Exception], ...] = ()

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


@dataclass
class PrefixStats:
    prompt_tokens: int = 0
    hit_tokens: int = 0


class Scheduler:
    def __init__(
        self,
        pool: BlockPool,
        *,
        block_size: int,
        max_running: int,
        token_budget: int,
        watermark: int,
        prefix_cache: bool = True,
    ) -> None:
        self.pool = pool
        self.prefix_cache = prefix_cache  # off: no block is named or looked up (benchmarks' baseline)
        self.block_size = block_size
        self.max_running = max_running
        self.token_budget = token_budget  # prompt tokens prefilled per step, at most
        self.watermark = watermark
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []  # in admission order: the last one is the youngest
        self.preemptions = 0
        self.prefix: dict[str | None, PrefixStats] = {}  # by adapter id (None = base model)

    # ----------------------------------------------------------------------------- lifecycle
    def add(self, seq: Seq) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Seq, gate: AdapterGate) -> None:
        """Remove a sequence wherever it is (done, cancelled or failed) and free what it holds."""
        if seq in self.running:
            self.running.remove(seq)
            gate.release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._drop_blocks(seq)

    def commit(self, plan: StepPlan) -> None:
        """Record that the runner computed the plan: advance ``num_computed``, name full blocks."""
        for chunk in plan.prefill:
            self._computed(chunk.seq, chunk.start + chunk.length)
        for seq in plan.decode:
            self._computed(seq, seq.num_computed + 1)

    def sequences(self) -> Iterator[Seq]:
        yield from self.waiting
        yield from self.running

    # ------------------------------------------------------------------------------ the step
    def schedule(self, gate: AdapterGate) -> StepPlan:
        preempted: list[Seq] = []
        decode: list[Seq] = []
        for seq in list(self.running):
            if seq not in self.running or seq.uncomputed != 1:
                continue
            while not self._grow(seq, seq.num_computed + 1):
                victim = self.running[-1]
                self._preempt(victim, gate)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                decode.append(seq)
        budget = self.token_budget
        prefill: list[Chunk] = []
        for seq in self.running:
            if budget == 0:
                break
            if seq.uncomputed > 1:
                budget -= self._chunk(seq, budget, prefill)
        failed: list[tuple[Seq, Exception]] = []
        if not preempted:
            budget = self._admit(gate, budget, prefill, failed)
        if not decode and not prefill and len(self.running) > 1:
            # Every running sequence waits for blocks another holds: the youngest gives way.
            victim = self.running[-1]
            self._preempt(victim, gate)
            preempted.append(victim)
        return StepPlan(tuple(prefill), tuple(decode), tuple(preempted), tuple(failed))

    def _admit(self, gate: AdapterGate, budget: int, prefill: list[Chunk], failed: list) -> int:
        in_flight = {h for r in self.running for h in r.hashes[r.num_named :]}  # blocks being prefilled
        for seq in list(self.waiting):
            if len(self.running) >= self.max_running or budget == 0:
                break
            try:
                identity = gate.acquire(seq)
            except Exception as e:  # handed to the request, which fails alone
                self.waiting.remove(seq)
                failed.append((seq, e))
                continue
            if identity is None:  # adapter loading, or no free slot: let others by
                continue
            if identity != seq.identity:
                seq.identity, seq.hashes = identity, []
            hit = self._prefix_hit(seq)
            if len(hit) < len(seq.hashes) and seq.hashes[len(hit)] in in_flight:  # hit it once cached
                gate.release(seq)
                continue
            reclaimed = sum(1 for b in hit if self.pool.is_free(b))
            need = self._blocks_for(len(seq.tokens)) - len(hit)
            available = self.pool.num_free - reclaimed
            if available - need < (self.watermark if self.running else 0):
                gate.release(seq)
                break
            self.pool.touch(hit)
            seq.blocks, seq.num_computed, seq.num_named = hit, len(hit) * self.block_size, len(hit)
            if not seq.admitted_once:
                seq.admitted_once = True
                stats = self.prefix.setdefault(seq.adapter_id, PrefixStats())
                stats.prompt_tokens += seq.num_prompt
                stats.hit_tokens += seq.num_computed
            self.waiting.remove(seq)
            self.running.append(seq)
            in_flight.update(seq.hashes[seq.num_named :])
            budget -= self._chunk(seq, budget, prefill)
        return budget

    # ------------------------------------------------------------------------------- helpers
    def _prefix_hit(self, seq: Seq) -> list[int]:
        """Cached blocks of ``seq``'s longest named prefix, leaving at least its last token to
        compute (the step needs that token's logits to sample from). No hits for a sequence that
        needs every prompt position's logits (``prompt_logprobs``: see engine/prompt_logprobs.py)."""
        if not self.prefix_cache or seq.needs_prompt_logits:
            return []
        usable = (len(seq.tokens) - 1) // self.block_size
        extend_block_hashes(seq.hashes, seq.identity, seq.tokens[: usable * self.block_size], self.block_size)
        return self.pool.lookup(seq.hashes[:usable])

    def _chunk(self, seq: Seq, budget: int, prefill: list[Chunk]) -> int:
        """Schedule up to ``budget`` of ``seq``'s uncomputed tokens, as far as blocks allow."""
        room = (len(seq.blocks) + self.pool.num_free) * self.block_size - seq.num_computed
        n = min(budget, seq.uncomputed, room)
        if n <= 0:
            return 0
        self._grow(seq, seq.num_computed + n)
        prefill.append(Chunk(seq, seq.num_computed, n, n == seq.uncomputed))
        return n

    def _grow(self, seq: Seq, tokens: int) -> bool:
        """Give ``seq`` blocks for its first ``tokens`` tokens; False if the pool is short."""
        need = self._blocks_for(tokens) - len(seq.blocks)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        seq.blocks += self.pool.allocate(need)
        return True

    def _preempt(self, seq: Seq, gate: AdapterGate) -> None:
        self.running.remove(seq)
        gate.release(seq)
        self._drop_blocks(seq)
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _drop_blocks(self, seq: Seq) -> None:
        self.pool.free(seq.blocks)
        seq.blocks, seq.num_computed, seq.num_named = [], 0, 0

    def _computed(self, seq: Seq, upto: int) -> None:
        seq.num_computed = upto
        full = upto // self.block_size
        if self.prefix_cache and full > seq.num_named:
            extend_block_hashes(seq.hashes, seq.identity, seq.tokens[: full * self.block_size], self.block_size)
            for i in range(seq.num_named, full):
                self.pool.cache(seq.blocks[i], seq.hashes[i])
            seq.num_named = full

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)
