"""The model replica: one Engine (base model + LoRA slots) per GPU, wired into Ray Serve.

A thin deployment: the engine, the slot manager and the store are plain objects tested without
Ray; this class only turns Serve calls into engine calls, reports state to the routers and
exports metrics. The engine loop runs in its own thread, so health checks and routing stats keep
answering while it computes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ray import serve
from ray.serve.metrics import Counter, Gauge, Histogram

from openlora_ray.engine.request import SamplingParams, StreamOutput, TokenLogprobs
from openlora_ray.errors import InvalidRequestError
from openlora_ray.serve.config import AppConfig
from openlora_ray.serve.engine_wiring import build_engine, open_store
from openlora_ray.serve.state import ReplicaState

log = logging.getLogger(__name__)

DISK_LIST_TTL_S = 5.0  # listing the disk cache walks folders; do it at most this often


class LoraReplica:
    def __init__(self, config: dict[str, Any]) -> None:
        cfg = AppConfig.model_validate(config)
        path = cfg.model_path()
        # The store's profile is checked before the model loads: a replica of the wrong shapes stops here.
        self.store = open_store(cfg.store, path, cfg.engine.max_rank) if cfg.store is not None else None
        self.engine, _ = build_engine(cfg.engine, path, self.store, self._observe_fetch)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._disk: tuple[float, frozenset[str]] = (0.0, frozenset())
        self._reported_tiers: dict[str, int] = {}
        self._reported_evictions = 0
        self._m_loads = Counter("openlora_adapter_loads", "adapter acquisitions by where the adapter was found", tag_keys=("tier",))
        self._m_load_s = Histogram("openlora_adapter_load_seconds", "time to get an adapter from the store or disk cache to host RAM", boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10], tag_keys=("tier",))
        self._m_evictions = Counter("openlora_adapter_evictions", "adapters evicted from a slot to the host tier")
        self._m_queue = Gauge("openlora_engine_queue_depth", "requests waiting in the engine")
        self._m_running = Gauge("openlora_engine_running", "requests decoding")
        self._m_slots = Gauge("openlora_slots_used", "LoRA slots holding an adapter")
        self._m_kv_free = Gauge("openlora_kv_blocks_free", "KV-cache blocks no running request holds (cached prefixes included)")
        self._m_kv_cached = Gauge("openlora_kv_blocks_cached", "KV-cache blocks holding a named prompt prefix")
        self._m_prefix_tokens = Counter("openlora_prefix_tokens", "prompt tokens admitted, by whether the prefix cache held them", tag_keys=("cache",))
        self._m_preemptions = Counter("openlora_preemptions", "running requests preempted for KV blocks (recomputed later)")
        self._reported_prefix = (0, 0, 0)  # prompt tokens, hit tokens, preemptions already exported
        log.info("replica %s ready (model %s)", self.replica_id, path)

    def _observe_fetch(self, tier: str, seconds: float) -> None:
        """Engine worker thread: an adapter resolved from the node disk cache or the store."""
        self._m_loads.inc(tags={"tier": tier})
        self._m_load_s.observe(seconds, tags={"tier": tier})

    async def generate(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream one request. The adapter id arrives as Serve's multiplexed model id."""
        adapter = serve.get_multiplexed_model_id() or None
        params = SamplingParams.model_validate(payload["params"])
        request = self.engine.make_request(payload["prompt"], adapter, params, payload["request_id"])
        if payload.get("fit_max_tokens"):  # the caller left max_tokens out: as many as fit, up to the default
            room = self.engine.config.max_seq_len - len(request.prompt_ids)
            if 0 < room < params.max_tokens:
                request = dataclasses.replace(request, params=params.model_copy(update={"max_tokens": room}))
        echo, vllm_k = bool(payload.get("echo")), payload.get("prompt_logprobs")
        async for out in self.engine.generate(request):
            item = {
                "text": out.text,
                "tokens": len(out.token_ids),
                "finish_reason": out.finish_reason,
                "prompt_tokens": out.prompt_tokens,
                "completion_tokens": out.completion_tokens,
                "ttft_s": out.time_to_first_token_s,
                "tpot_s": out.mean_token_latency_s,
                "replica": self.replica_id,
                "logprobs": self._logprobs(out) if params.logprobs is not None else None,
            }
            if echo:  # completions' echo: the first increment starts with the prompt
                item, echo = self._echoed(item, payload["prompt"], request.prompt_ids, out, k=params.logprobs), False
            if vllm_k is not None and out.prompt_logprobs:
                item["prompt_logprobs"] = self._prompt_logprobs(request.prompt_ids, out.prompt_logprobs, vllm_k)
            yield item

    def _echoed(
        self, item: dict[str, Any], prompt: Any, ids: Sequence[int], out: StreamOutput, *, k: int | None
    ) -> dict[str, Any]:
        """``item`` behind the prompt's text (as sent, or its ids decoded) and, when the prompt was
        scored, its tokens' log probabilities with ``k`` alternatives (marked ``prompt``: ``best_of``
        ranks without them)."""
        tokenizer = self.engine.tokenizer
        text = prompt if isinstance(prompt, str) or tokenizer is None else tokenizer.decode(list(ids))
        item = {**item, "text": text + item["text"]}
        if item["logprobs"] is not None and out.prompt_logprobs:
            name = self._token_text

            def entry(t: int, lp: TokenLogprobs | None) -> dict[str, Any]:
                if lp is None:  # the first token: nothing before it to predict it
                    return {"token": name(t), "logprob": None, "top": None, "prompt": True}
                top = [[name(i), v] for i, v in lp.top[:k]]
                return {"token": name(t), "logprob": lp.token_logprob, "top": top, "prompt": True}

            item["logprobs"] = [entry(t, lp) for t, lp in zip(ids, out.prompt_logprobs, strict=True)] + item["logprobs"]
        return item

    def _prompt_logprobs(
        self, ids: Sequence[int], scores: Sequence[TokenLogprobs | None], k: int
    ) -> list[dict[str, dict[str, Any]] | None]:
        """vLLM's ``prompt_logprobs``: per prompt token, None for the first, else {token id: {logprob,
        rank, decoded_token}} for the token itself and the ``k`` most likely (ranks 1..k)."""
        text = self._token_text
        out: list[dict[str, dict[str, Any]] | None] = []
        for t, lp in zip(ids, scores, strict=True):
            if lp is None:
                out.append(None)
                continue
            entry = {str(t): {"logprob": lp.token_logprob, "rank": lp.rank, "decoded_token": text(t)}}
            for rank, (i, v) in enumerate(lp.top[:k], start=1):
                entry.setdefault(str(i), {"logprob": v, "rank": rank, "decoded_token": text(i)})
            out.append(entry)
        return out

    def _logprobs(self, out: StreamOutput) -> list[dict[str, Any]]:
        """Each token's text and log probability, with its top alternatives': the ingress has no
        tokenizer, and OpenAI's shapes name tokens by their text."""
        text = self._token_text
        return [
            {"token": text(t), "logprob": lp.token_logprob, "top": [[text(i), v] for i, v in lp.top]}
            for t, lp in zip(out.token_ids, out.logprobs, strict=False)
        ]

    def _token_text(self, token_id: int) -> str:
        tokenizer = self.engine.tokenizer
        return tokenizer.decode([token_id]) if tokenizer is not None else f"token_id:{token_id}"

    def tokenize(self, prompt: Any, token_strs: bool = False) -> dict[str, Any]:
        """/tokenize: the ids the engine would see for this prompt (text or a ChatPrompt)."""
        ids = self.engine.tokenize(prompt)
        strs = self.engine.tokenizer.convert_ids_to_tokens(ids) if token_strs else None
        return {"max_model_len": self.engine.config.max_seq_len, "tokens": ids, "token_strs": strs}

    def detokenize(self, ids: list[int]) -> str:
        """/detokenize: ids checked against the vocabulary, special tokens kept in the text."""
        if self.engine.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer")
        return self.engine.tokenizer.decode(self.engine.tokenize(ids) if ids else [])

    def state(self) -> ReplicaState:
        s = self.engine.stats
        return ReplicaState(
            replica_id=self.replica_id,
            resident=frozenset(s.resident_adapters),
            host=frozenset(s.host_adapters),
            disk=self._disk_ids(),
            loading=frozenset(s.loading_adapters),
            num_slots=s.num_slots,
            free_slots=s.free_slots,
            free_vram_mb=s.free_device_bytes >> 20,
            free_kv_blocks=s.free_kv_blocks,
            total_kv_blocks=s.total_kv_blocks,
            queued=s.queue_depth,
            running=s.running,
            max_running=self.engine.config.max_running,
        )

    def _disk_ids(self) -> frozenset[str]:
        when, ids = self._disk
        if self.store is not None and time.monotonic() - when > DISK_LIST_TTL_S:
            ids = frozenset(self.store.cached_ids())
            self._disk = (time.monotonic(), ids)
        return ids

    def record_routing_stats(self) -> dict[str, Any]:
        """Polled by the Serve controller; also where the engine's counters become metrics."""
        self._export_metrics()
        return self.state().to_stats()

    def describe(self) -> dict[str, Any]:
        """Management view: routing state plus operator pins and counters."""
        s = self.engine.stats
        kv = {
            "total_blocks": s.total_kv_blocks,
            "free_blocks": s.free_kv_blocks,
            "cached_blocks": s.cached_kv_blocks,
            "block_size": s.kv_block_size,
            "preemptions": s.preemptions,
            "prefix_hit_rate": s.prefix_hit_rate,
        }
        prefix = {a or "": {"prompt_tokens": p.prompt_tokens, "hit_tokens": p.hit_tokens, "hit_rate": p.hit_rate} for a, p in s.prefix.items()}
        return {
            **self.state().to_stats(),
            "pinned": list(s.pinned_adapters),
            "loads_by_tier": s.loads_by_tier,
            "evictions": s.evictions,
            "tokens_per_s": s.tokens_per_s,
            "kv": kv,
            "prefix": prefix,  # by adapter, "" = the base model
        }

    async def prefetch(self, adapter_id: str, targets: list[str] | None = None, pin: bool = False) -> str | None:
        """Load (and optionally pin) an adapter here if this replica is among ``targets``."""
        if targets is not None and self.replica_id not in targets:
            return None
        await self.engine.prefetch(adapter_id, pin=pin)
        return self.replica_id

    async def unpin(self, adapter_id: str, targets: list[str] | None = None) -> str | None:
        if targets is not None and self.replica_id not in targets:
            return None
        await self.engine.unpin(adapter_id)
        return self.replica_id

    async def evict(self, adapter_id: str, targets: list[str] | None = None) -> str | None:
        if targets is not None and self.replica_id not in targets:
            return None
        await self.engine.evict(adapter_id)
        return self.replica_id

    def check_health(self) -> None:
        if not self.engine.healthy():
            raise RuntimeError(f"engine loop of replica {self.replica_id} is stuck or dead")

    def _export_metrics(self) -> None:
        s = self.engine.stats
        self._m_queue.set(s.queue_depth)
        self._m_running.set(s.running)
        self._m_slots.set(s.num_slots - s.free_slots)
        for tier in ("slot", "host"):
            delta = s.loads_by_tier.get(tier, 0) - self._reported_tiers.get(tier, 0)
            if delta > 0:
                self._m_loads.inc(delta, tags={"tier": tier})
        self._reported_tiers = dict(s.loads_by_tier)
        if s.evictions > self._reported_evictions:
            self._m_evictions.inc(s.evictions - self._reported_evictions)
            self._reported_evictions = s.evictions
        self._m_kv_free.set(s.free_kv_blocks)
        self._m_kv_cached.set(s.cached_kv_blocks)
        prompt = sum(p.prompt_tokens for p in s.prefix.values())
        hits = sum(p.hit_tokens for p in s.prefix.values())
        was_prompt, was_hits, was_preempted = self._reported_prefix
        if hits > was_hits:
            self._m_prefix_tokens.inc(hits - was_hits, tags={"cache": "hit"})
        if prompt - hits > was_prompt - was_hits:
            self._m_prefix_tokens.inc(prompt - hits - (was_prompt - was_hits), tags={"cache": "miss"})
        if s.preemptions > was_preempted:
            self._m_preemptions.inc(s.preemptions - was_preempted)
        self._reported_prefix = (prompt, hits, s.preemptions)

    def __del__(self) -> None:
        # Serve calls this on graceful shutdown (after draining its own requests); idempotent.
        engine = getattr(self, "engine", None)
        if engine is not None:
            self.engine = None
            engine.shutdown(drain_timeout_s=5)
