"""``openlora-ray bench scaling``: one replica's throughput from a handful of adapters to thousands.

S-LoRA's yardstick (8.05 -> 7.61 requests/s from 5 to 2,000 adapters on one A100, -5.5%) asks
what serving many adapters costs once they no longer fit the device. Here one engine with a fixed
number of slots serves N registered adapters (N = 5 ... 2,000; ranks 8-64 mixed) through the
replica's own wiring (``serve/engine_wiring.py``): the slots, the engine's host tier, and the
node's disk cache in front of a folder store. Requests pick their adapter uniformly or by
Zipf(1.0) rank; every configuration serves the same seeded prompt and output lengths, from a
closed loop of more clients than the engine runs at once (so requests queue, as under load), and
the throughput at the largest N is compared with the smallest. With ``repeats`` every configuration
runs that many times, the repeats interleaved and each in the opposite order of N to the last (a
machine that slows down over the run then weighs on both ends), and the loss is the median of the
repeats' losses: on a shared VM single runs of the same configuration differ by 10 % or more. The
disk cache holds every adapter and is warm before the clock starts (a node's steady state); the
host tier and the slots hold what their budgets allow, so at large N nearly every request needs a
load.

Adapters are written straight into the store's layout (PEFT safetensors with random non-zero
weights, and a manifest): thousands are made in seconds, and kept under ``--cache-dir`` for the
next run.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from openlora_ray.adapter_format import BaseModelDims
from openlora_ray.bench.engine_bench import isolated
from openlora_ray.bench.timing import cpu_model, print_table, write_json
from openlora_ray.engine.config import EngineSettings
from openlora_ray.engine.request import SamplingParams
from openlora_ray.errors import OpenLoraError
from openlora_ray.serve.engine_wiring import build_engine, open_store
from openlora_ray.store.manifest import MANIFEST_FILE, build_manifest
from openlora_ray.store.profile import StoreProfile
from openlora_ray.store.settings import StoreSettings

log = logging.getLogger(__name__)

TARGET_LOSS = 0.05  # throughput lost from the smallest to the largest N, at most

MiB = 1 << 20


@dataclass(frozen=True)
class ScalingConfig:
    counts: tuple[int, ...] = (5, 100, 1000, 2000)
    distributions: tuple[str, ...] = ("uniform", "zipf")
    ranks: tuple[int, ...] = (8, 16, 32, 64)
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # PEFT's default for Llama: 2,000 adapters in ~7 GB
    num_slots: int = 32
    max_running: int = 32
    concurrency: int = 48  # closed-loop clients: more than run at once, so requests queue
    requests: int = 128  # per configuration
    prompt_range: tuple[int, int] = (16, 64)
    output_range: tuple[int, int] = (16, 80)
    host_cache_mib: int = 256
    disk_cache_gib: int = 64
    max_seq_len: int = 256
    threads: int | None = None
    seed: int = 0
    repeats: int = 1
    # LoRA ops to compare (OPENLORA_RAY_LORA_KERNEL in each run's process: auto, kernel, bmm); the
    # losses are reported per op, run side by side in every repeat, and the first is the headline
    lora_ops: tuple[str, ...] = ("auto",)


# ------------------------------------------------------------------------------- the adapters
def adapter_rank(cfg: ScalingConfig, i: int) -> int:
    return cfg.ranks[i % len(cfg.ranks)]


def make_store(model_dir: Path, cfg: ScalingConfig, cache_dir: Path) -> Path:
    """A folder store holding ``max(cfg.counts)`` adapters ``bench-{i}@v1`` (reused when present)."""
    dims = BaseModelDims.from_model_dir(model_dir)
    tag = f"{model_dir.resolve().name}-{'-'.join(cfg.targets)}-r{'.'.join(map(str, cfg.ranks))}-s{cfg.seed}"
    root = cache_dir.expanduser() / tag / "store"
    root.mkdir(parents=True, exist_ok=True)
    profile = root / "openlora-store.json"
    if not profile.exists():
        profile.write_bytes(StoreProfile.from_model_dir(model_dir, max_rank=max(cfg.ranks)).to_json())
    start, made = time.monotonic(), 0
    for i in range(max(cfg.counts)):
        folder = root / f"bench-{i}" / "v1"
        if (folder / MANIFEST_FILE).exists():
            continue
        _write_peft(folder, dims, adapter_rank(cfg, i), cfg.targets, seed=cfg.seed * 100_003 + i, base=str(model_dir))
        (folder / MANIFEST_FILE).write_bytes(build_manifest(f"bench-{i}", "v1", folder).to_json())
        made += 1
    if made:
        log.info("wrote %d adapters into %s in %.1fs", made, root, time.monotonic() - start)
    return root


def _write_peft(folder: Path, dims: BaseModelDims, rank: int, targets: tuple[str, ...], seed: int, base: str) -> None:
    """PEFT's save_pretrained layout in bfloat16 (as the base's checkpoint), A and B random and
    non-zero (a freshly initialised PEFT adapter has B = 0, which would test nothing).

    Each tensor is a slice, at a random offset, of a pool of random values drawn once per scale:
    drawing millions of values per adapter made writing 2,000 adapters take most of an hour on 2
    cores. The safetensors file (an 8-byte header length, a JSON header, the raw data) is written
    in one piece from those slices."""
    folder.mkdir(parents=True, exist_ok=True)
    pick = random.Random(seed)
    header: dict[str, Any] = {}
    chunks: list[bytes] = []
    offset = 0
    for layer in range(dims.num_layers):
        for proj in targets:
            fan_in, fan_out = dims.in_out(proj)
            prefix = f"base_model.model.model.layers.{layer}.{_module(proj)}.{proj}"
            for ab, shape, scale in (("A", (rank, fan_in), 1 / math.sqrt(fan_in)), ("B", (fan_out, rank), 0.01)):
                pool = _random_pool(scale)
                n = shape[0] * shape[1]
                start = pick.randrange(len(pool) - n)
                data = pool[start : start + n].tobytes()
                header[f"{prefix}.lora_{ab}.weight"] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
                chunks.append(data)
                offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data to 8 bytes
    (folder / "adapter_model.safetensors").write_bytes(len(head).to_bytes(8, "little") + head + b"".join(chunks))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": list(targets), "bias": "none", "base_model_name_or_path": base, "use_rslora": False,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


@functools.cache
def _random_pool(scale: float, size: int = 1 << 22) -> np.ndarray:
    """``size`` bfloat16 values of N(0, scale^2), as their raw 16-bit patterns."""
    values = torch.randn(size, generator=torch.Generator().manual_seed(size)) * scale
    return values.bfloat16().view(torch.int16).numpy()


def _module(proj: str) -> str:
    return "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


# ------------------------------------------------------------------------------ the workload
@dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    max_tokens: int
    adapter: str | None


def workload(cfg: ScalingConfig, n: int, distribution: str, vocab: int) -> list[Request]:
    """The same prompts and lengths for every (N, distribution); only the adapters differ."""
    shape = random.Random(cfg.seed)
    lengths = [(shape.randint(*cfg.prompt_range), shape.randint(*cfg.output_range)) for _ in range(cfg.requests)]
    prompts = [tuple(shape.randrange(3, vocab) for _ in range(p)) for p, _ in lengths]
    pick = random.Random(f"{cfg.seed}-{n}-{distribution}")
    if distribution == "uniform":
        chosen = [pick.randrange(n) for _ in lengths]
    elif distribution == "zipf":
        order = list(range(n))
        pick.shuffle(order)  # popularity rank -> adapter, so the popular ones are of every rank
        chosen = [order[r] for r in pick.choices(range(n), weights=[1 / (k + 1) for k in range(n)], k=len(lengths))]
    else:
        raise ValueError(f"unknown distribution {distribution!r}")
    return [Request(p, out, f"bench-{a}@v1") for p, (_, out), a in zip(prompts, lengths, chosen)]


# ---------------------------------------------------------------------------------- a run
@dataclass(frozen=True)
class LoopShare:
    """Where the engine loop spent a run: the step forwards (decode rows and the prefill chunks that
    join them; decode rows per step fall when requests wait for their adapters), prefill forwards
    run alone, sampling, converting read adapters to tensors and writing them into slots; shares of
    the run's wall time."""

    steps: int
    rows_per_step: float  # decode rows
    ms_per_step: float
    step: float
    prefill: float
    sample: float
    convert: float
    slot_write: float


class LoopClock:
    """Times the engine's runner calls and adapter conversions and slot writes while a run lasts,
    by wrapping those methods on the instances (the engine itself is not changed for the bench)."""

    PARTS = ("step", "prefill", "sample", "convert", "slot_write")

    def __init__(self, engine: Any) -> None:
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self.steps = self.decode_rows = 0
        targets = {
            "step": (engine.runner, "step"), "prefill": (engine.runner, "prefill"),
            "sample": (engine.runner, "sample"), "convert": (engine.adapters, "collect"),
            "slot_write": (engine.adapters.slots.buffers, "write_slot"),
        }
        for part, (obj, name) in targets.items():
            setattr(obj, name, self._timed(part, getattr(obj, name)))

    def _timed(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start
                if part == "step":
                    self.steps += 1
                    self.decode_rows += len(args[0])

        return call

    def share(self, wall_s: float) -> LoopShare:
        steps = max(self.steps, 1)
        return LoopShare(
            steps=self.steps, rows_per_step=self.decode_rows / steps,
            ms_per_step=1e3 * self.seconds["step"] / steps,
            **{part: self.seconds[part] / wall_s for part in self.PARTS},
        )


class RssSampler:
    """The process's resident set, sampled while a run lasts (its maximum is reported)."""

    def __init__(self, period_s: float = 0.1) -> None:
        self.period_s, self.max_bytes = period_s, current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.max_bytes = max(self.max_bytes, current_rss())


def current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class RunResult:
    adapters: int
    distribution: str
    repeat: int
    distinct: int  # adapters the requests used
    requests: int
    tokens: int
    makespan_s: float
    req_per_s: float
    tok_per_s: float
    steady_tok_per_s: float  # tokens/s until the last request was sent (see ``_drive``)
    ttft_p50_s: float
    ttft_p99_s: float
    slot_hits: int
    host_loads: int
    disk_loads: int
    store_downloads: int
    evictions: int
    rss_max_mib: float
    loop: LoopShare  # where the engine loop's time went
    lora_op: str = "auto"  # as asked for (ScalingConfig.lora_ops)
    lora_op_used: str = ""  # what the engine's groups run one-token rows on: kernel, bmm, or both (per shape)
    errors: int = 0
    notes: list[str] = field(default_factory=list)


def run_one(
    model_dir: Path,
    cfg: ScalingConfig,
    store_root: Path,
    node_cache: Path,
    n: int,
    distribution: str,
    repeat: int = 0,
    lora_op: str = "auto",
) -> RunResult:
    os.environ["OPENLORA_RAY_LORA_KERNEL"] = lora_op  # a process of its own: the choice is made afresh
    settings = EngineSettings(
        num_slots=cfg.num_slots, max_rank=max(cfg.ranks), max_running=cfg.max_running, max_seq_len=cfg.max_seq_len,
        max_queue=cfg.concurrency, host_cache_bytes=cfg.host_cache_mib * MiB, memory_budget_bytes=8 << 30,
        torch_threads=cfg.threads,
    )
    store = open_store(
        StoreSettings(uri=str(store_root), cache_dir=node_cache, cache_bytes=cfg.disk_cache_gib << 30, check_finite=False),
        model_dir, max_rank=settings.max_rank,
    )
    for i in range(n):  # the node's disk cache is warm: a replica that has served these adapters before
        store.fetch(f"bench-{i}@v1")
    engine, resolver = build_engine(settings, model_dir, store)
    try:
        requests = workload(cfg, n, distribution, engine.model.config.vocab_size)
        asyncio.run(_drive(engine, [Request(requests[0].prompt[:8], 2, None)], 1))  # the model's first call
        fetched_before = dict(resolver.fetches)
        clock = LoopClock(engine)
        with RssSampler() as rss:
            start = time.monotonic()
            results, steady = asyncio.run(_drive(engine, requests, cfg.concurrency))
            makespan = time.monotonic() - start
        tiers = engine.stats.loads_by_tier
        ok = [r for r in results if r is not None]
        ttfts = sorted(t for t, _ in ok)
        tokens = sum(k for _, k in ok)
        return RunResult(
            adapters=n, distribution=distribution, repeat=repeat, distinct=len({r.adapter for r in requests}),
            requests=len(ok), tokens=tokens, makespan_s=makespan, req_per_s=len(ok) / makespan,
            tok_per_s=tokens / makespan, steady_tok_per_s=steady,
            ttft_p50_s=_quantile(ttfts, 0.5), ttft_p99_s=_quantile(ttfts, 0.99),
            slot_hits=tiers.get("slot", 0), host_loads=tiers.get("host", 0), disk_loads=tiers.get("fetch", 0),
            store_downloads=resolver.fetches["store"] - fetched_before["store"], evictions=engine.stats.evictions,
            rss_max_mib=rss.max_bytes / MiB, loop=clock.share(makespan), errors=len(results) - len(ok),
            lora_op=lora_op, lora_op_used=_op_used(engine.model),
        )
    finally:
        engine.shutdown(drain_timeout_s=1)


def _op_used(model: Any) -> str:
    kinds = {"kernel" if g.kernel is not None else "bmm" for layer in model.layers for g in layer.groups.values()}
    return "+".join(sorted(kinds))


async def _drive(
    engine: Any, requests: list[Request], concurrency: int
) -> tuple[list[tuple[float, int] | None], float]:
    """Closed loop: ``concurrency`` clients, each sending the next request when its last one ends.

    Returns (TTFT and tokens per request, None where it failed; the steady throughput). The steady
    throughput counts the tokens emitted from the first request sent until the last one is: the
    engine runs under load all that time. What follows, the drain, runs ever fewer rows, and how
    long it lasts depends on which requests happen to be sent last, not on the number of adapters,
    so the whole run's rate carries that noise (the same five adapters measured 5-12 % apart)."""
    queue = iter(enumerate(requests))
    out: list[tuple[float, int] | None] = [None] * len(requests)
    emitted: list[tuple[float, int]] = []
    start, last_sent = time.monotonic(), math.inf

    async def client() -> None:
        nonlocal last_sent
        for i, r in queue:
            params = SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)
            sent, first, tokens = time.monotonic(), None, 0
            if i == len(requests) - 1:
                last_sent = sent
            try:
                async for item in engine.generate(engine.make_request(list(r.prompt), r.adapter, params)):
                    first = first or time.monotonic()
                    tokens += len(item.token_ids)
                    emitted.append((time.monotonic(), len(item.token_ids)))
            except OpenLoraError as e:  # counted and reported: one failed request must not end the run
                log.warning("request %d (%s) failed: %s", i, r.adapter, e)
                continue
            out[i] = (first - sent, tokens)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    steady = sum(n for t, n in emitted if t <= last_sent) / max(last_sent - start, 1e-9)
    return out, steady


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1)]


# ---------------------------------------------------------------------------------- report
def run(model_dir: Path, cfg: ScalingConfig, out: Path, cache_dir: Path) -> dict[str, Any]:
    started = time.monotonic()
    store_root = make_store(model_dir, cfg, cache_dir)
    node_cache = store_root.parent / "node-cache"
    results: list[RunResult] = []
    for repeat, n, dist in run_order(cfg):
        for op in cfg.lora_ops:
            # Each configuration in a fresh process: its RSS is its own, not the previous engines' leftovers.
            results.append(isolated(cfg.threads, run_one, model_dir, cfg, store_root, node_cache, n, dist, repeat, op))
            # A long run's finished configurations are kept even if it is stopped.
            runs = [asdict(r) for r in results]
            write_json(out, {"bench": "scaling", "partial": True, "cpu": cpu_model(), "runs": runs})
            log.info("N=%d %s (repeat %d, %s): %.3f req/s", n, dist, repeat, op, results[-1].req_per_s)
    sizes = [p.stat().st_size for p in (store_root / f"bench-{i}" / "v1" / "adapter_model.safetensors"
                                        for i in range(max(cfg.counts)))]
    by_op = {
        op: {dist: repeat_losses(results, cfg, dist, "steady_tok_per_s", op) for dist in cfg.distributions}
        for op in cfg.lora_ops
    }
    losses = by_op[cfg.lora_ops[0]]
    loss = {dist: statistics.median(each) for dist, each in losses.items()}
    whole_run = {
        dist: statistics.median(repeat_losses(results, cfg, dist, "req_per_s", cfg.lora_ops[0]))
        for dist in cfg.distributions
    }
    rss = [r.rss_max_mib for r in results]
    traffic = traffic_model(model_dir, cfg)
    report = {
        "bench": "scaling",
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "model": str(model_dir),
        "config": asdict(cfg),
        "adapter_file_mib": {"mean": statistics.mean(sizes) / MiB, "max": max(sizes) / MiB,
                             "total_at_max_n": sum(sizes) / MiB},
        "runs": [asdict(r) for r in results],
        "throughput_loss": loss,  # of the steady throughput (see _drive); the median over repeats
        "throughput_loss_by_repeat": losses,
        "throughput_loss_whole_run": whole_run,  # of requests/s over the whole run, drain included
        "throughput_loss_by_op": {
            op: {dist: statistics.median(each) for dist, each in per.items()} for op, per in by_op.items()
        },
        "target_loss": TARGET_LOSS,
        "target_met": all(v <= TARGET_LOSS for v in loss.values()),
        "traffic_model": traffic,
        "rss_growth_mib": max(rss) - min(rss),
        "wall_s": time.monotonic() - started,
    }
    write_json(out, report)
    _print(report, results)
    return report


def run_order(cfg: ScalingConfig) -> list[tuple[int, int, str]]:
    """(repeat, N, distribution) in the order they run: each repeat in the opposite order of N to the last."""
    return [
        (repeat, n, dist)
        for repeat in range(cfg.repeats)
        for n in (cfg.counts if repeat % 2 == 0 else cfg.counts[::-1])
        for dist in cfg.distributions
    ]


def repeat_losses(
    results: list[RunResult], cfg: ScalingConfig, distribution: str, metric: str, lora_op: str = "auto"
) -> list[float]:
    """``1 - metric(largest N) / metric(smallest N)`` in each repeat: the two runs of one repeat ran close in time."""
    def at(n: int, repeat: int) -> float:
        return next(
            getattr(r, metric) for r in results
            if (r.adapters, r.distribution, r.repeat, r.lora_op) == (n, distribution, repeat, lora_op)
        )

    lo, hi = min(cfg.counts), max(cfg.counts)
    return [1 - at(hi, k) / at(lo, k) for k in range(cfg.repeats)]


def expected_distinct(weights: list[float], batch: int) -> float:
    """Distinct adapters expected among ``batch`` requests drawn with these popularity ``weights``."""
    total = sum(weights)
    return sum(1 - (1 - w / total) ** batch for w in weights)


def traffic_model(model_dir: Path, cfg: ScalingConfig) -> dict[str, Any]:
    """The throughput loss from the smallest to the largest N if a decode step cost the bytes it
    must read: the base weights once, plus each distinct adapter's slot copy (float32, its rank on
    its target projections) once, however many rows use it. On a batch of distinct adapters that
    read grows with N until every row has its own; no kernel avoids reading it (S-LoRA's GPU kernels
    read the same bytes). A model, not a bound: a step that is partly compute-bound loses less (the
    measured Zipf loss has come out below it), one that copies the adapters loses more."""
    from safetensors import safe_open

    dims = BaseModelDims.from_model_dir(model_dir)
    numel = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            numel += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())  # noqa: SIM118 - not a dict
    itemsize = 4  # the engine's float32 on CPU
    widths = {p: sum(dims.in_out(p)) for p in cfg.targets}
    sizes = [adapter_rank(cfg, i) * sum(widths.values()) * dims.num_layers * itemsize for i in range(len(cfg.ranks))]
    adapter = statistics.mean(sizes)
    base = numel * itemsize
    out = {}
    for dist in cfg.distributions:
        def weights(n: int, dist: str = dist) -> list[float]:
            return [1.0] * n if dist == "uniform" else [1 / (k + 1) for k in range(n)]

        lo = expected_distinct(weights(min(cfg.counts)), cfg.max_running)
        hi = expected_distinct(weights(max(cfg.counts)), cfg.max_running)
        x = (base + hi * adapter) / (base + lo * adapter)
        out[dist] = {"distinct_lo": lo, "distinct_hi": hi, "traffic_x": x, "min_loss": 1 - 1 / x}
    return {"base_mib": base / MiB, "adapter_mib": adapter / MiB, "by_distribution": out}


def _change(loss: float) -> str:
    return f"{'loss' if loss >= 0 else 'gain'} {abs(loss):.1%}"


def _print(report: dict[str, Any], results: list[RunResult]) -> None:
    cfg = report["config"]
    print(f"bench scaling on {report['cpu']} ({report['torch_threads']} torch threads); model {report['model']}")
    print(f"{cfg['num_slots']} slots, max_running {cfg['max_running']}, {cfg['concurrency']} closed-loop clients, "
          f"{cfg['requests']} requests per run; host tier {cfg['host_cache_mib']} MiB; ranks {cfg['ranks']} on "
          f"{'+'.join(cfg['targets'])} (files {report['adapter_file_mib']['mean']:.1f} MiB mean)")
    print_table(
        ["N", "dist", "run", "LoRA op", "used", "req/s", "tok/s", "steady tok/s", "TTFT p50 s", "TTFT p99 s",
         "slot hits", "host", "disk", "store", "evictions", "RSS max MiB", "errors"],
        [[r.adapters, r.distribution, r.repeat + 1, f"{r.lora_op} ({r.lora_op_used})", r.distinct, r.req_per_s,
          r.tok_per_s, r.steady_tok_per_s,
          r.ttft_p50_s, r.ttft_p99_s, r.slot_hits, r.host_loads, r.disk_loads, r.store_downloads, r.evictions,
          f"{r.rss_max_mib:.0f}", r.errors] for r in results],
    )
    print("where the engine loop's time went (shares of each run's wall time):")
    print_table(
        ["N", "dist", "run", "LoRA op", "steps", "decode rows/step", "ms/step", "step", "prefill alone", "sample",
         "convert", "slot write"],
        [[r.adapters, r.distribution, r.repeat + 1, r.lora_op, r.loop.steps, r.loop.rows_per_step, r.loop.ms_per_step,
          *(f"{getattr(r.loop, p):.1%}" for p in LoopClock.PARTS)] for r in results],
    )
    for dist, loss in report["throughput_loss"].items():
        each = report["throughput_loss_by_repeat"][dist]
        runs = f" (median of {len(each)} runs: {', '.join(_change(x) for x in each)})" if len(each) > 1 else ""
        print(f"{dist}: steady throughput {_change(loss)} from N={min(cfg['counts'])} to N={max(cfg['counts'])}"
              f"{runs} (target: loss <= {TARGET_LOSS:.0%}); requests/s over the whole run: "
              f"{_change(report['throughput_loss_whole_run'][dist])}")
    if len(cfg["lora_ops"]) > 1:
        others = "; ".join(
            f"{op}: " + ", ".join(f"{dist} {_change(v)}" for dist, v in per.items())
            for op, per in report["throughput_loss_by_op"].items() if op != cfg["lora_ops"][0]
        )
        print(f"LoRA op {cfg['lora_ops'][0]} above; the others, run beside it in every repeat (median loss): {others}")
    b = report["traffic_model"]
    print(f"memory-traffic model: a decode step of a full batch ({cfg['max_running']} rows) reads the base weights "
          f"({b['base_mib']:.0f} MiB) and each distinct adapter's slot once ({b['adapter_mib']:.1f} MiB mean):")
    for dist, row in b["by_distribution"].items():
        print(f"  {dist}: {row['distinct_lo']:.1f} distinct adapters per batch at N={min(cfg['counts'])}, "
              f"{row['distinct_hi']:.1f} at N={max(cfg['counts'])}: bytes per step x{row['traffic_x']:.2f}, "
              f"so a throughput loss of {row['min_loss']:.1%} if decode were bound by memory traffic alone")
    print(f"RSS max across N: spread {report['rss_growth_mib']:.0f} MiB; wall {report['wall_s']:.0f} s")
