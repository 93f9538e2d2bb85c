"""``openlora-ray bench routing``: this project's router against Serve's default router and Serve's
multiplexing, on one real local Ray cluster.

One run starts its own cluster (``ray.init`` with faked GPUs, Serve's HTTP proxy on 127.0.0.1
only), writes a small random Llama (SmolLM2's tokenizer) and real PEFT adapters of it into a
local-folder adapter store, and then deploys three configurations one after another, each sent
the same seeded, Zipf-distributed stream of streaming completions over HTTP by a fixed number of
closed-loop clients, after an unmeasured warm-up of base-model requests (``make_warmup``), the
first of them after a throwaway pass that lets the fresh cluster settle (``settle_cluster``):

* ``affinity``: the application as ``openlora_ray.serve.app.build`` makes it, with this project's
  ``LoraAffinityRouter``;
* ``p2c``: the same deployments routed by Ray Serve's default ``PowerOfTwoChoicesRequestRouter``.
  ``LoraReplica`` never reports multiplexed model ids, so the router's multiplex matching finds
  no holder and falls back to all replicas: two random choices, shorter queue, no adapter
  awareness;
* ``multiplex``: Serve's multiplexing. ``MultiplexReplica`` awaits a ``@serve.multiplexed``
  loader (as many models per replica as the engine has slots) before generating; the loader
  loads the adapter into a slot and Serve's LRU eviction evicts it from the engine. Routed by the
  default router, whose ``MultiplexMixin`` prefers replicas that report the adapter.

The three differ only in the router class and, for ``multiplex``, the replica class: they are
built by ``app.build`` with those swapped in (``build_variant``), and with the ingress's
``max_ongoing_requests`` set to the client concurrency for all three, so the bench measures the
routers rather than an ingress cap.

How each figure is obtained:

* loads: the replicas' own counters, from ``describe()`` broadcast at the end of a configuration.
  Every admission of a request acquires its adapter's slot and counts where it found it:
  ``slot`` (already resident: a hit), ``host`` (host-RAM tier) or ``fetch`` (read from the
  node's disk cache, downloading from the store first if needed). Each replica has a disk cache
  of its own, as on a cluster with one GPU per node (``own_node_class``), empty at the start of
  each configuration; ``store_downloads`` counts their entries together. For ``multiplex`` the
  loader loads the adapter before the request is admitted, so the admission then finds it in a
  slot; ``describe`` moves those acquisitions from ``slot`` to ``fetch`` (the loader reads the
  adapter from disk) and counts the multiplex evictions.
* on-holder share: a sampler thread broadcasts ``describe`` every ``snapshot_interval_s`` and
  keeps, per snapshot, which adapters sit in each replica's slots and when the broadcast
  returned. A request counts as *for a resident adapter* when the last snapshot returned before
  the request was sent shows its adapter in some replica's slots, and as *on a holder* when the
  replica that served it (the ``x-openlora-replica`` response header) is one of those. The
  snapshot is up to one interval old (plus the broadcast's own time), so an adapter evicted or
  loaded in between counts against every router alike; ``snapshot_age_mean_s`` says how stale.
* time to first token: measured by the client, from sending the request to the first SSE event
  that carries text (or ends the stream); it includes the HTTP proxy, ingress, routing, queueing,
  any adapter load and the prefill.
* throughput: completed requests and completion tokens (from the usage chunk) over the wall time
  from the first request sent to the last one finished.
* balance: ``busiest_replica_share``, from the same snapshots (running plus queued requests).
* ``reference_loads``: the same trace replayed offline through per-replica LRU slots under random
  and under perfectly partitioned routing, the yardstick for the load counts; and the lower bound
  of any router's loads on the trace (``lower_bound``), against which the loads targets report
  the best ratio any router could reach (``best_possible``).

The JSON also keeps one row per request (``log``), the machine's load average around each
configuration (timings on a shared machine are only as good as it was quiet) and short hashes of
the measured sources (the router changes between runs).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import concurrent.futures
import json
import logging
import os
import platform
import random
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import requests

from openlora_ray.bench.timing import print_table, write_json
from openlora_ray.errors import AdapterInUseError, CapacityError, OpenLoraError

if TYPE_CHECKING:
    from openlora_ray.serve.config import AppConfig

# Ray, torch and the Serve application are imported where they are used: registering the
# command with the CLI must stay cheap.

log = logging.getLogger(__name__)

VARIANTS = ("affinity", "p2c", "multiplex")
DEFAULT_ROUTER_CLASS = "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"

# Base models: random Llamas with SmolLM2's tokenizer. "tiny" is the test suite's recipe; "small"
# is big enough that reading, validating and copying an adapter costs a few milliseconds.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4),
}
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Words for the prompts: only their count matters.
WORDS = (
    "the quick brown fox jumps over a lazy dog while river stones glisten under morning light "
    "engineers measure latency across many adapters and small models answer questions about "
    "history science music cooking travel weather gardens mountains oceans cities libraries"
).split()

# Targets of issue 5's benchmark.
TARGET_HOLDER_SHARE = 0.95  # of requests for a resident adapter, reaching a replica holding it
TARGET_LOADS_VS_DEFAULT = 0.25  # adapter loads, against the default router's
EVICT_WAIT_S = 10.0  # how long a multiplex eviction waits for the engine before giving up


@dataclass(frozen=True)
class RoutingBenchConfig:
    """The cluster, the workload and the run's bounds; the defaults are issue 5's benchmark sized
    to finish in under ten minutes on a 2-core machine."""

    model_size: str = "small"
    replicas: int = 4
    slots: int = 4
    adapters: int = 200
    rank: int = 16
    requests: int = 1200  # per configuration: p99 is then the 12th slowest, not a handful of outliers
    concurrency: int = 12  # closed-loop clients
    warmup_requests: int = 24  # base-model requests before the measured ones (not measured)
    settle_requests: int = 120  # adapter requests to a throwaway deployment before the first configuration
    zipf: float = 1.1
    max_tokens: int = 16
    min_prompt_words: int = 8
    max_prompt_words: int = 24
    max_running: int = 8  # engine batch (KV rows) per replica
    stats_period_s: float = 1.0  # replicas' routing-stats period (AppConfig's default)
    router: dict[str, Any] = field(default_factory=dict)  # RouterSettings fields for ``affinity``
    snapshot_interval_s: float = 0.25
    variant_time_limit_s: float = 300.0  # stop sending after this long; what finished counts
    request_timeout_s: float = 60.0
    deploy_timeout_s: float = 120.0
    variants: tuple[str, ...] = VARIANTS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model_size not in MODEL_PRESETS:
            raise OpenLoraError(f"model_size must be one of {sorted(MODEL_PRESETS)}")
        unknown = set(self.variants) - set(VARIANTS)
        if unknown or not self.variants:
            raise OpenLoraError(f"variants must be among {VARIANTS}, got {self.variants}")
        if min(self.replicas, self.slots, self.adapters, self.requests, self.concurrency, self.rank) < 1:
            raise OpenLoraError("replicas, slots, adapters, requests, concurrency and rank must be >= 1")
        if self.warmup_requests < 0 or self.settle_requests < 0:
            raise OpenLoraError("warmup_requests and settle_requests must be >= 0")
        if not 1 <= self.min_prompt_words <= self.max_prompt_words:
            raise OpenLoraError("need 1 <= min_prompt_words <= max_prompt_words")
        from openlora_ray.serve.routing import RouterSettings

        try:
            RouterSettings(**self.router)  # fail now, not in the ingress replica minutes later
        except ValueError as e:
            raise OpenLoraError(f"router settings: {e}") from e


# ------------------------------------------------------------------------ Serve's multiplexing
class _MultiplexedAdapter:
    """What Serve's multiplex LRU holds for one adapter of a ``MultiplexReplica``: dropping it
    evicts the adapter from the engine.

    Serve calls ``__del__`` when it evicts the entry (in an executor thread) and Python calls it
    again when the object is collected (Serve's attempt to disable it sets an instance attribute,
    which Python ignores), so it is idempotent.
    """

    def __init__(self, replica: Any, adapter_id: str) -> None:
        self.replica = replica
        self.adapter_id = adapter_id
        self._released = False

    def __del__(self) -> None:
        if self._released:
            return
        self._released = True
        self.replica._evict_for_multiplex(self.adapter_id)


@cache
def multiplex_replica_class() -> type:
    """``MultiplexReplica``: ``LoraReplica`` whose adapters Serve's ``@serve.multiplexed`` loads
    and evicts. Made on first use, so that importing this module does not import torch and Ray
    (Serve ships the class to the replicas by value)."""
    from ray import serve

    from openlora_ray.serve.replica import LoraReplica

    class MultiplexReplica(LoraReplica):
        """The loader is wired per instance because ``max_num_models_per_replica`` must equal the
        engine's slot count, which comes from the config (Serve detects an instance attribute
        wrapped by ``serve.multiplexed`` as multiplexing). It wraps a plain function: Serve keeps
        its model cache as an attribute of the wrapped callable, which a bound method cannot
        carry."""

        def __init__(self, config: dict[str, Any]) -> None:
            super().__init__(config)
            self._loop: asyncio.AbstractEventLoop | None = None
            self._multiplex_loads = 0
            self._multiplex_evictions = 0
            self._evictions_refused = 0

            async def load(adapter_id: str) -> _MultiplexedAdapter:
                return await self._load_for_multiplex(adapter_id)

            self._load_adapter = serve.multiplexed(max_num_models_per_replica=self.engine.config.num_slots)(load)

        async def generate(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
            adapter = serve.get_multiplexed_model_id()
            if adapter:
                await self._load_adapter(adapter)
            async for item in super().generate(payload):
                yield item

        async def _load_for_multiplex(self, adapter_id: str) -> _MultiplexedAdapter:
            self._loop = asyncio.get_running_loop()
            cold = adapter_id not in self.engine.stats.resident_adapters
            try:
                await self.engine.prefetch(adapter_id)
            except CapacityError:
                # Every slot is held by running requests: the engine loads the adapter when the
                # request is admitted, and counts that load itself.
                cold = False
            if cold:
                self._multiplex_loads += 1
            return _MultiplexedAdapter(self, adapter_id)

        def _evict_for_multiplex(self, adapter_id: str) -> None:
            """Evict on the replica's loop; wait for it when called off the loop (Serve's executor
            thread), so that Serve's per-replica load lock also covers the eviction."""
            engine, loop = self.engine, self._loop
            if engine is None or loop is None or loop.is_closed():
                return
            future = asyncio.run_coroutine_threadsafe(engine.evict(adapter_id), loop)
            future.add_done_callback(self._count_eviction)
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # no loop runs in this thread: safe to block
                concurrent.futures.wait([future], timeout=EVICT_WAIT_S)

        def _count_eviction(self, future: concurrent.futures.Future) -> None:
            error = None if future.cancelled() else future.exception()
            if error is None:
                self._multiplex_evictions += 1
            elif isinstance(error, AdapterInUseError):
                # Still decoding for a request: the engine keeps it and evicts by its own LRU later.
                self._evictions_refused += 1
            else:
                log.warning("multiplex eviction of an adapter failed: %s", error)

        def describe(self) -> dict[str, Any]:
            """``LoraReplica.describe`` with the multiplex loader's loads and evictions folded in.

            The request behind each multiplex load then finds its adapter in a slot, so that
            acquisition moves from ``slot`` to ``fetch`` (the loader read the adapter from disk).
            """
            d = super().describe()
            tiers = dict(d["loads_by_tier"])
            moved = min(self._multiplex_loads, tiers.get("slot", 0))
            tiers["slot"] = tiers.get("slot", 0) - moved
            tiers["fetch"] = tiers.get("fetch", 0) + moved
            return {
                **d,
                "loads_by_tier": tiers,
                "evictions": d["evictions"] + self._multiplex_evictions,
                "multiplex_loads": self._multiplex_loads,
                "multiplex_evictions_refused": self._evictions_refused,
            }

    return MultiplexReplica


def router_class(variant: str) -> str:
    from openlora_ray.serve.app import ROUTER_CLASS

    return ROUTER_CLASS if variant == "affinity" else DEFAULT_ROUTER_CLASS


@cache
def own_node_class(base: type) -> type:
    """``base`` with a disk cache of its own, as if each replica ran on its own node.

    That is the layout of ``cluster/`` and ``k8s/`` (one GPU per node), where every replica pulls
    from the store what its node lacks. On one machine all replicas would otherwise share the
    configured cache folder, and a store download by one would serve them all. Each replica
    takes a sub-folder named by its replica id.
    """
    from ray import serve

    class OwnNodeReplica(base):
        def __init__(self, config: dict[str, Any]) -> None:
            replica_id = serve.get_replica_context().replica_id.unique_id
            store = {**config["store"], "cache_dir": Path(config["store"]["cache_dir"]) / replica_id}
            super().__init__({**config, "store": store})

    OwnNodeReplica.__name__ = OwnNodeReplica.__qualname__ = f"OwnNode{base.__name__}"
    return OwnNodeReplica


def replica_class(variant: str) -> type:
    from openlora_ray.serve.replica import LoraReplica

    return own_node_class(multiplex_replica_class() if variant == "multiplex" else LoraReplica)


def build_variant(cfg: AppConfig, variant: str, ingress_max_ongoing: int) -> Any:
    """The application of one configuration: ``app.build`` with the variant's router and replica
    classes and the ingress concurrency set to the client concurrency (see the module doc)."""
    from openlora_ray.serve.app import build

    cfg = cfg.model_copy(update={"ingress_max_ongoing_requests": ingress_max_ongoing})
    return build(cfg, replica_class=replica_class(variant), router_class=router_class(variant))


# ------------------------------------------------------------------------------- the workload
@dataclass(frozen=True)
class WorkItem:
    adapter: str  # the name the client sends
    prompt: str
    seed: int


BASE_MODEL_NAME = "base"  # the bench app's served_model_name: no adapter


def adapter_name(i: int) -> str:
    return f"a{i:03d}"


def pinned_id(name: str) -> str:
    """The immutable id the replicas report for a name (every adapter is pushed as ``@v1``)."""
    return f"{name}@v1"


def make_workload(cfg: RoutingBenchConfig) -> list[WorkItem]:
    """Seeded requests; adapter ``a000`` is the most popular, ``P(rank k) ~ 1 / k**zipf``."""
    rng = np.random.default_rng(cfg.seed)
    weights = 1.0 / np.arange(1, cfg.adapters + 1, dtype=np.float64) ** cfg.zipf
    picks = rng.choice(cfg.adapters, size=cfg.requests, p=weights / weights.sum())
    words = random.Random(cfg.seed)
    items = []
    for i, k in enumerate(picks):
        n = words.randint(cfg.min_prompt_words, cfg.max_prompt_words)
        items.append(WorkItem(adapter_name(int(k)), " ".join(words.choice(WORDS) for _ in range(n)).capitalize(), cfg.seed * 1_000_003 + i))
    return items


def make_warmup(cfg: RoutingBenchConfig) -> list[WorkItem]:
    """Base-model requests sent before the measured ones: the first requests through a fresh
    deployment pay one-time costs (connections from the proxy and ingress, the replicas' first
    forward passes) that belong to no router, and with 12 clients starting at once they would be
    the twelve slowest of the run, which is p99 at 1,200 requests. No adapter is loaded: the
    measured requests still start with every adapter cold."""
    words = random.Random(cfg.seed + 1)
    return [
        WorkItem(BASE_MODEL_NAME, " ".join(words.choice(WORDS) for _ in range(cfg.max_prompt_words)).capitalize(), i)
        for i in range(cfg.warmup_requests)
    ]


# ------------------------------------------------------------------------------ the client
@dataclass
class RequestRecord:
    """What the client saw of one request; times in seconds since the configuration started."""

    index: int
    adapter: str  # pinned id
    sent: float
    done: float
    status: int  # HTTP status; 0 = no response (connection error or timeout)
    first: float | None = None  # first SSE event with text, or the end of the stream
    replica: str | None = None
    completion_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


def send_one(session: requests.Session, url: str, index: int, item: WorkItem, max_tokens: int, timeout_s: float, t0: float) -> RequestRecord:
    """One streaming completion; never raises (a failure is a record with ``error`` set)."""
    from openlora_ray.serve.ingress import REPLICA_HEADER

    body = {
        "model": item.adapter, "prompt": item.prompt, "max_tokens": max_tokens, "seed": item.seed,
        "stream": True, "stream_options": {"include_usage": True},
    }
    sent = time.monotonic()
    rec = RequestRecord(index, pinned_id(item.adapter), sent - t0, sent - t0, 0)
    try:
        with session.post(f"{url}/v1/completions", json=body, stream=True, timeout=timeout_s) as resp:
            rec.status = resp.status_code
            rec.replica = resp.headers.get(REPLICA_HEADER)
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}"
            else:
                _read_stream(resp, rec, t0)
    except (requests.RequestException, ValueError) as e:  # ValueError: a malformed SSE event
        rec.error = type(e).__name__
    rec.done = time.monotonic() - t0
    return rec


def _read_stream(resp: requests.Response, rec: RequestRecord, t0: float) -> None:
    for line in resp.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            break
        event = json.loads(data)
        if "error" in event:
            rec.error = str(event["error"].get("type", "error"))
            break
        choices = event.get("choices") or []
        if rec.first is None and choices and (choices[0].get("text") or choices[0].get("finish_reason")):
            rec.first = time.monotonic() - t0
        if event.get("usage"):
            rec.completion_tokens = int(event["usage"]["completion_tokens"])
    if rec.error is None and rec.first is None:
        rec.error = "empty stream"


def run_clients(url: str, work: list[WorkItem], cfg: RoutingBenchConfig, t0: float) -> list[RequestRecord]:
    """``cfg.concurrency`` closed-loop clients take the next request as soon as theirs finished,
    until the workload is exhausted or ``cfg.variant_time_limit_s`` has passed."""
    next_index = iter(range(len(work)))
    lock = threading.Lock()
    deadline = t0 + cfg.variant_time_limit_s
    records: list[RequestRecord] = []

    def client() -> None:
        with requests.Session() as session:
            while time.monotonic() < deadline:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                rec = send_one(session, url, i, work[i], cfg.max_tokens, cfg.request_timeout_s, t0)
                with lock:
                    records.append(rec)

    with concurrent.futures.ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="bench-client") as pool:
        for f in [pool.submit(client) for _ in range(cfg.concurrency)]:
            f.result()
    if len(records) < len(work):
        log.warning("time limit of %.0f s reached: %d of %d requests sent", cfg.variant_time_limit_s, len(records), len(work))
    return sorted(records, key=lambda r: r.index)


# ------------------------------------------------------------------- residency snapshots
@dataclass(frozen=True)
class Snapshot:
    """Which adapters sat in each replica's slots, and each replica's requests (running plus
    queued in the engine), as of ``at`` (when the broadcast returned)."""

    at: float
    resident: dict[str, frozenset[str]]
    age_s: float  # how long the broadcast took: the state is at most this much older than ``at``
    load: dict[str, int] = field(default_factory=dict)


class ResidencySampler:
    """Broadcasts ``describe`` to the replicas every ``interval_s`` in a background thread."""

    def __init__(self, handle: Any, interval_s: float, t0: float) -> None:
        self.handle = handle
        self.interval_s = interval_s
        self.t0 = t0
        self.snapshots: list[Snapshot] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="residency-sampler", daemon=True)

    def __enter__(self) -> ResidencySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                described = self.handle.broadcast("describe").results(timeout_s=10)
            except Exception as e:  # noqa: BLE001 - a missed snapshot is counted, the run goes on
                self.failures += 1
                log.debug("residency snapshot failed: %s", e)
            else:
                end = time.monotonic()
                resident = {d["replica_id"]: frozenset(d["resident"]) for d in described}
                load = {d["replica_id"]: d["running"] + d["queued"] for d in described}
                self.snapshots.append(Snapshot(end - self.t0, resident, end - start, load))
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - start)))


# ------------------------------------------------------------------------------ analysis
def holder_share(records: list[RequestRecord], snapshots: list[Snapshot]) -> dict[str, Any]:
    """Of the served requests whose adapter the last snapshot before sending showed in some
    replica's slots, how many the serving replica was one of those holders (see the module doc)."""
    times = [s.at for s in snapshots]
    eligible = on_holder = 0
    ages = []
    for rec in records:
        if rec.replica is None:
            continue
        i = bisect.bisect_right(times, rec.sent) - 1
        if i < 0:
            continue
        snap = snapshots[i]
        holders = {replica for replica, ids in snap.resident.items() if rec.adapter in ids}
        if not holders:
            continue
        eligible += 1
        on_holder += rec.replica in holders
        ages.append(rec.sent - snap.at + snap.age_s)
    return {
        "requests_for_resident": eligible,
        "on_holder": on_holder,
        "share": on_holder / eligible if eligible else None,
        "snapshot_age_mean_s": float(np.mean(ages)) if ages else None,
    }


def busiest_share(snapshots: list[Snapshot]) -> float | None:
    """Mean, over snapshots with work in flight, of the busiest replica's share of it: 1/replicas
    is a perfect balance, 1.0 everything on one replica."""
    shares = [max(s.load.values()) / sum(s.load.values()) for s in snapshots if sum(s.load.values()) > 0]
    return float(np.mean(shares)) if shares else None


def load_counts(described: list[dict[str, Any]]) -> dict[str, Any]:
    """Cluster totals of the replicas' acquisition counters (``describe()`` at the end)."""
    tiers = Counter()
    for d in described:
        tiers.update(d["loads_by_tier"])
    acquisitions = sum(tiers.values())
    loads = tiers["host"] + tiers["fetch"]
    return {
        "slot_hits": tiers["slot"],
        "host_loads": tiers["host"],
        "fetch_loads": tiers["fetch"],
        "slot_loads": loads,
        "slot_hit_rate": tiers["slot"] / acquisitions if acquisitions else None,
        "evictions": sum(d["evictions"] for d in described),
        "multiplex_evictions_refused": sum(d.get("multiplex_evictions_refused", 0) for d in described),
    }


def request_metrics(records: list[RequestRecord]) -> dict[str, Any]:
    """Throughput, time to first token and errors of one configuration's requests."""
    ok = [r for r in records if r.ok]
    span = (max(r.done for r in records) - min(r.sent for r in records)) if records else 0.0
    ttft = [r.first - r.sent for r in ok if r.first is not None]
    tokens = sum(r.completion_tokens for r in ok)
    per_replica = Counter(r.replica for r in ok)

    def pct(q: float) -> float | None:
        return float(np.percentile(ttft, q)) if ttft else None

    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "error_kinds": dict(Counter(r.error for r in records if not r.ok)),
        "duration_s": span,
        "requests_per_s": len(ok) / span if span else 0.0,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / span if span else 0.0,
        "ttft_p50_s": pct(50),
        "ttft_p99_s": pct(99),
        "ttft_mean_s": float(np.mean(ttft)) if ttft else None,
        "requests_per_replica": sorted(per_replica.values(), reverse=True),
    }


def reference_loads(work: list[WorkItem], replicas: int, slots: int, seed: int) -> dict[str, dict[str, int]]:
    """The same trace replayed offline, one request at a time, through per-replica LRU slots with
    an unbounded host tier, for two idealised policies: ``random`` routing and a ``partitioned``
    one (every adapter always on the same replica, by hash). It shows what the slot count allows:
    even a perfect partition pays one fetch per distinct adapter and misses whenever a replica's
    share of the adapters does not fit its slots.

    ``lower_bound`` holds for every router: each distinct adapter is fetched at least once, and
    the cluster's slots together are one cache of ``replicas * slots`` adapters, whose misses are
    at least those of clairvoyant MIN (Belady) on the same sequence; every miss is a slot load."""
    from openlora_ray.serve.ring import stable_hash
    from openlora_ray.serve.simulate import belady_hits

    rng = random.Random(seed)
    policies = {"random": lambda _: rng.randrange(replicas), "partitioned": lambda a: stable_hash(a) % replicas}
    out = {}
    for name, route in policies.items():
        lru: list[OrderedDict[str, None]] = [OrderedDict() for _ in range(replicas)]
        seen: list[set[str]] = [set() for _ in range(replicas)]
        slot_loads = fetch_loads = 0
        for item in work:
            r = route(item.adapter)
            if item.adapter in lru[r]:
                lru[r].move_to_end(item.adapter)
                continue
            slot_loads += 1
            fetch_loads += item.adapter not in seen[r]
            seen[r].add(item.adapter)
            lru[r][item.adapter] = None
            if len(lru[r]) > slots:
                lru[r].popitem(last=False)
        out[name] = {"slot_loads": slot_loads, "fetch_loads": fetch_loads}
    index: dict[str, int] = {}
    sequence = np.array([index.setdefault(item.adapter, len(index)) for item in work], dtype=np.int64)
    out["lower_bound"] = {"slot_loads": len(work) - belady_hits(sequence, replicas * slots), "fetch_loads": len(index)}
    return out


def evaluate_targets(results: dict[str, dict[str, Any]], lower_bound: dict[str, int]) -> dict[str, Any]:
    """Issue 5's targets, for ``affinity`` against ``p2c`` (only those whose inputs were run).

    Each loads target also says the best ratio any router could reach on this trace
    (``reference_loads``' lower bound over the default's count): above the target, no routing
    policy meets it."""
    targets: dict[str, Any] = {}
    ours, default = results.get("affinity"), results.get("p2c")
    if ours is not None and ours["holder"]["share"] is not None:
        share = ours["holder"]["share"]
        targets["holder_share"] = {"value": share, "target": f">= {TARGET_HOLDER_SHARE}", "met": share >= TARGET_HOLDER_SHARE}
    if ours is not None and default is not None:
        for key in ("slot_loads", "fetch_loads"):
            ratio = ours["loads"][key] / default["loads"][key] if default["loads"][key] else None
            met = ratio is not None and ratio <= TARGET_LOADS_VS_DEFAULT
            best = lower_bound[key] / default["loads"][key] if default["loads"][key] else None
            targets[f"{key}_vs_default"] = {"value": ratio, "target": f"<= {TARGET_LOADS_VS_DEFAULT}", "met": met, "best_possible": best}
        a, b = ours["ttft_p99_s"], default["ttft_p99_s"]
        targets["ttft_p99_vs_default"] = {"value": a / b if a and b else None, "target": "< 1", "met": bool(a and b and a < b)}
    return targets


# --------------------------------------------------------------------------- model and store
def make_base_model(out: Path, size: str, seed: int) -> Path:
    """A random Llama of the preset's shape with SmolLM2's tokenizer, saved as a HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from openlora_ray.model.prepare import prepare_demo_model

    tokenizer = AutoTokenizer.from_pretrained(prepare_demo_model())
    torch.manual_seed(seed)
    config = LlamaConfig(
        **MODEL_PRESETS[size], vocab_size=len(tokenizer), max_position_embeddings=512, rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def make_store(root: Path, model_dir: Path, count: int, rank: int, seed: int) -> Path:
    """``count`` real PEFT adapters (rank ``rank``, every projection) pushed as ``aNNN@v1``.

    One PEFT model is built and its LoRA weights refilled per adapter (B non-zero, unlike PEFT's
    init), which is what ``save_peft_adapter`` in the tests does, without reloading the base.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from openlora_ray.store.settings import StoreSettings
    from openlora_ray.store.store import AdapterStore

    uri = root / "adapters"
    uri.mkdir(parents=True)
    store = AdapterStore(StoreSettings(uri=str(uri), cache_dir=root / "push-cache"))
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(ALL_PROJECTIONS), lora_dropout=0.0),
    )
    lora_params = [p for name, p in peft_model.named_parameters() if "lora_" in name]
    store_log = logging.getLogger("openlora_ray.store.store")
    level = store_log.level
    store_log.setLevel(logging.WARNING)  # not one "pushed" line per adapter
    try:
        for i in range(count):
            gen = torch.Generator().manual_seed(seed * 7919 + i)
            with torch.no_grad():
                for p in lora_params:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            folder = root / "src" / adapter_name(i)
            peft_model.save_pretrained(folder, safe_serialization=True)
            store.push(folder, pinned_id(adapter_name(i)))
    finally:
        store_log.setLevel(level)
    shutil.rmtree(root / "src")
    return uri


def app_config(cfg: RoutingBenchConfig, model_dir: Path, store_uri: Path, node_cache: Path) -> AppConfig:
    from openlora_ray.engine.config import EngineSettings
    from openlora_ray.serve.config import AppConfig, ReplicaSettings
    from openlora_ray.store.settings import StoreSettings

    return AppConfig(
        model=str(model_dir),
        served_model_name=BASE_MODEL_NAME,
        engine=EngineSettings(
            num_slots=cfg.slots, max_rank=cfg.rank, max_running=cfg.max_running, max_seq_len=256,
            torch_threads=1, memory_budget_bytes=1 << 30,
        ),
        store=StoreSettings(uri=str(store_uri), cache_dir=node_cache),
        router=cfg.router,
        replicas=ReplicaSettings(
            num_replicas=cfg.replicas, num_cpus=0, num_gpus=1, stats_period_s=cfg.stats_period_s,
            health_check_period_s=5, graceful_shutdown_timeout_s=1,
        ),
        ingress_num_cpus=0,
        auth={"enabled": False},
    )


# ----------------------------------------------------------------------------------- the run
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deploy(app: Any, name: str, timeout_s: float) -> None:
    """``serve.run`` bounded in time: it waits for ever if the replicas cannot be placed."""
    from ray import serve

    errors: list[BaseException] = []

    def target() -> None:
        try:
            serve.run(app, name=name, route_prefix="/")
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)

    thread = threading.Thread(target=target, name=f"deploy-{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise OpenLoraError(f"deploying {name} took longer than {timeout_s:.0f} s")
    if errors:
        raise errors[0]


@contextmanager
def deployed(variant: str, cfg: RoutingBenchConfig, app_cfg: AppConfig, name: str) -> Iterator[Any]:
    """The variant's application, deployed as ``name`` for the ``with`` block: its replica handle."""
    from ray import serve

    from openlora_ray.serve.app import REPLICA_DEPLOYMENT

    _deploy(build_variant(app_cfg, variant, ingress_max_ongoing=max(5, 2 * cfg.concurrency)), name, cfg.deploy_timeout_s)
    try:
        yield serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=name)
    finally:
        serve.delete(name)


def settle_cluster(cfg: RoutingBenchConfig, url: str, model_dir: Path, store_uri: Path, root: Path) -> dict[str, Any]:
    """A throwaway pass before the first configuration, so that it does not pay for the cluster's
    first minute alone: Ray's freshly started workers, first reads of the libraries and files the
    replicas use. Measured without it, the first configuration (whichever router) sent 27
    requests in its first five seconds against 43-47 for the later ones. It deploys Serve's
    default router (random placement exercises every replica's adapter path) and sends
    ``settle_requests`` requests from a differently seeded trace; nothing is measured."""
    if cfg.settle_requests == 0:
        return {"requests": 0}
    app_cfg = app_config(cfg, model_dir, store_uri, root / "node-cache-settle")
    work = make_workload(replace(cfg, requests=cfg.settle_requests, seed=cfg.seed + 1))
    start = time.monotonic()
    with deployed("p2c", cfg, app_cfg, "routing-settle"):
        records = run_clients(url, work, cfg, time.monotonic())
    return {"requests": len(records), "errors": sum(not r.ok for r in records), "seconds": time.monotonic() - start}


def run_variant(variant: str, cfg: RoutingBenchConfig, url: str, model_dir: Path, store_uri: Path, root: Path, work: list[WorkItem]) -> dict[str, Any]:
    """Deploy one configuration on a fresh node cache, send it the workload, measure, delete it."""
    app_cfg = app_config(cfg, model_dir, store_uri, root / f"node-cache-{variant}")
    load_before = os.getloadavg()[0]
    start = time.monotonic()
    with deployed(variant, cfg, app_cfg, f"routing-{variant}") as handle:
        deploy_s = time.monotonic() - start
        warmup = run_clients(url, make_warmup(cfg), cfg, time.monotonic())
        t0 = time.monotonic()
        with ResidencySampler(handle, cfg.snapshot_interval_s, t0) as sampler:
            records = run_clients(url, work, cfg, t0)
        described = handle.broadcast("describe").results(timeout_s=30)
    result = {
        "router_class": router_class(variant),
        "replica_class": replica_class(variant).__name__,
        "deploy_s": deploy_s,
        "warmup": {"requests": len(warmup), "errors": sum(not r.ok for r in warmup)},
        # This machine's 1-minute load average around the traffic: other work skews the timings.
        "load_avg_1m": {"before": load_before, "after": os.getloadavg()[0]},
        **request_metrics(records),
        "loads": {**load_counts(described), "store_downloads": store_downloads(app_cfg)},
        "holder": {**holder_share(records, sampler.snapshots), "snapshots": len(sampler.snapshots), "snapshot_failures": sampler.failures},
        "busiest_replica_share": busiest_share(sampler.snapshots),
        # One row per request: [adapter, replica, sent s, ttft s or None, HTTP status, error or None].
        "log": [[r.adapter, r.replica, round(r.sent, 4), None if r.first is None else round(r.first - r.sent, 4), r.status, r.error] for r in records],
    }
    log.info(
        "%s: %d/%d ok in %.1f s, TTFT p99 %.3f s, slot hit rate %s, on holder %s",
        variant, result["ok"], result["requests"], result["duration_s"], result["ttft_p99_s"] or float("nan"),
        result["loads"]["slot_hit_rate"], result["holder"]["share"],
    )
    return result


def store_downloads(app_cfg: AppConfig) -> int:
    """Adapters the replicas pulled from the store: the entries of their node caches together
    (each cache started empty, and keeps every download within its budget)."""
    from openlora_ray.store.store import AdapterStore

    root = app_cfg.store.resolved_cache_dir
    folders = [d for d in root.iterdir() if d.is_dir()] if root.is_dir() else []
    return sum(len(AdapterStore(app_cfg.store.model_copy(update={"cache_dir": d})).cached_ids()) for d in folders)


def code_fingerprint() -> dict[str, str]:
    """Short sha256 of the sources whose behaviour is measured: the router changes between
    runs, and a figure is only comparable with one taken on the same code."""
    import hashlib
    import importlib.util

    out = {}
    for module in ("openlora_ray.serve.router", "openlora_ray.serve.routing", "openlora_ray.serve.replica", "openlora_ray.serve.ingress", "openlora_ray.engine.engine"):
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin is not None:
            out[module] = hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()[:12]
    return out


def run(cfg: RoutingBenchConfig, out: Path) -> dict[str, Any]:
    """The whole benchmark: cluster up, store built, each configuration in turn, cluster down."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private, loopback-only cluster
    import ray
    from ray import serve

    started = time.monotonic()
    fingerprint = code_fingerprint()  # before the run: the files may change while it goes on
    root = Path(tempfile.mkdtemp(prefix="openlora-bench-routing-"))
    results: dict[str, dict[str, Any]] = {}
    settled: dict[str, Any] = {}
    try:
        model_dir = make_base_model(root / "model", cfg.model_size, cfg.seed)
        store_uri = make_store(root, model_dir, cfg.adapters, cfg.rank, cfg.seed)
        setup_s = time.monotonic() - started
        log.info("base model %s and %d adapters ready in %.1f s", cfg.model_size, cfg.adapters, setup_s)
        work = make_workload(cfg)
        references = reference_loads(work, cfg.replicas, cfg.slots, cfg.seed)
        ray.init(
            num_cpus=2, num_gpus=cfg.replicas, include_dashboard=False, log_to_driver=False, namespace="openlora-bench",
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
        )
        try:
            port = _free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            url = f"http://127.0.0.1:{port}"
            settled = settle_cluster(cfg, url, model_dir, store_uri, root)
            for variant in cfg.variants:
                results[variant] = run_variant(variant, cfg, url, model_dir, store_uri, root, work)
        finally:
            serve.shutdown()
            ray.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = {
        "benchmark": "routing",
        "config": asdict(cfg),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "code_sha256": fingerprint,
        "distinct_adapters_requested": len({w.adapter for w in work}),
        "reference_loads": references,
        "setup_s": setup_s,
        "settle": settled,
        "total_s": time.monotonic() - started,
        "variants": results,
        "targets": evaluate_targets(results, references["lower_bound"]),
    }
    write_json(out, report)
    _print(report)
    return report


def _print(report: dict[str, Any]) -> None:
    rows = []
    for variant, m in report["variants"].items():
        loads, holder = m["loads"], m["holder"]
        rows.append([
            variant, f"{m['ok']}/{m['requests']}", m["requests_per_s"], m["tokens_per_s"], m["ttft_p50_s"] or 0.0, m["ttft_p99_s"] or 0.0,
            loads["slot_hit_rate"] or 0.0, loads["fetch_loads"], loads["host_loads"], loads["store_downloads"],
            holder["share"] if holder["share"] is not None else "-", m["errors"],
        ])
    print_table(
        ["router", "ok", "req/s", "tok/s", "ttft p50 s", "ttft p99 s", "slot hit", "fetch", "host", "store dl", "on holder", "errors"],
        rows,
    )
    for name, ref in report["reference_loads"].items():
        what = "lower bound for any routing" if name == "lower_bound" else f"offline replay, {name} routing"
        print(f"{what}: {ref['slot_loads']} slot loads, {ref['fetch_loads']} fetch loads")
    for name, t in report["targets"].items():
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        best = f" (best possible on this trace: {t['best_possible']:.3f})" if t.get("best_possible") is not None else ""
        print(f"target {name}: {value} (target {t['target']}): {'met' if t['met'] else 'MISSED'}{best}")


# ----------------------------------------------------------------------------------- the CLI
def register_bench(benches: argparse._SubParsersAction) -> None:
    """Add ``routing`` to ``openlora-ray bench``'s subcommands."""
    d = RoutingBenchConfig()
    p = benches.add_parser("routing", help="adapter-affinity router vs Serve's default router and multiplexing, on a local cluster")
    p.add_argument("--model-size", choices=sorted(MODEL_PRESETS), default=d.model_size, help="random base model (default: %(default)s)")
    p.add_argument("--replicas", type=int, default=d.replicas, help="model replicas, one fake GPU each (default: %(default)s)")
    p.add_argument("--slots", type=int, default=d.slots, help="LoRA slots per replica (default: %(default)s)")
    p.add_argument("--adapters", type=int, default=d.adapters, help="adapters in the store (default: %(default)s)")
    p.add_argument("--rank", type=int, default=d.rank, help="LoRA rank, all projections (default: %(default)s)")
    p.add_argument("--requests", type=int, default=d.requests, help="requests per configuration (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="closed-loop clients (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup_requests, help="unmeasured base-model requests first, per configuration (default: %(default)s)")
    p.add_argument("--settle", type=int, default=d.settle_requests, help="requests to a throwaway deployment before the first configuration (default: %(default)s)")
    p.add_argument("--zipf", type=float, default=d.zipf, help="Zipf exponent of adapter popularity (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="completion tokens per request (default: %(default)s)")
    p.add_argument("--max-running", type=int, default=d.max_running, help="engine batch per replica (default: %(default)s)")
    p.add_argument("--time-limit", type=float, default=d.variant_time_limit_s, help="seconds of traffic per configuration, at most (default: %(default)s)")
    p.add_argument("--router", metavar="FIELD=VALUE", action="append", default=[], help="a RouterSettings field for the affinity router, e.g. spill_load=0.5 (repeatable; default: the app's defaults)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(d.variants), help="configurations to run (default: all)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, default=Path("bench-results/routing.json"))
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    cfg = RoutingBenchConfig(
        model_size=args.model_size, replicas=args.replicas, slots=args.slots, adapters=args.adapters, rank=args.rank,
        requests=args.requests, concurrency=args.concurrency, warmup_requests=args.warmup, settle_requests=args.settle,
        zipf=args.zipf, max_tokens=args.max_tokens, max_running=args.max_running, variant_time_limit_s=args.time_limit, variants=tuple(args.variants), seed=args.seed,
        router={k: json.loads(v) for k, v in (item.split("=", 1) for item in args.router)},
    )
    run(cfg, args.out)
    return 0
