"""``openlora-ray bench soak``: a bounded load of good and bad requests against a local cluster.

Issue 7, "Load and soak". The benchmark starts everything it needs on this machine and stops it
again: a Ray cluster, an S3 store (moto's server on 127.0.0.1, or a plain folder), the Serve
application built by :func:`openlora_ray.serve.app.build`, and ``--adapters`` real PEFT adapters
pushed through the store's validation. Then ``--concurrency`` clients send requests over HTTP on
the loopback interface for ``--duration`` seconds, closed loop (each client sends its next request
when the previous one has ended), and the run stops by itself.

The mix is mostly good requests (completions and chat, streamed or not, greedy or sampled) over
the adapters with a Zipf popularity, so a few adapters are hot and most are cold, and the
adapters far outnumber the slots, the host-RAM budget and the disk-cache budget: every tier
evicts all the time. The rest are bad requests, each of which has exactly one right answer: an
unknown adapter (404), a corrupted adapter written into the store behind the store's back (400,
code invalid_adapter), a malformed adapter id (400), an oversize prompt (400, from the ingress or
from the engine), and a body that is not JSON (400).

What it reports, and the targets it checks:

* requests sent, answered as expected, refused (429/503: the intended overload answers) and
  *unexpected* (any other status, a 5xx, a stream that breaks off or carries an error event, a
  transport error or a client timeout), by kind; target zero unexpected and every good request
  answered;
* latency percentiles of good requests: time to the first SSE event of streams (TTFT) and the
  total time of every good request;
* the resident set size of each replica process (psutil, by process tree of this driver) at the
  start, at the end of ``--warmup`` and at the end; targets: growth after warm-up within a small
  tolerance, and growth since the start within the per-replica host-RAM budget plus a fixed
  allowance for batch workspaces. The budgets are set well below what all the adapters need, so
  memory that followed the number of distinct adapters seen would break the targets (run with more
  ``--adapters`` and the same budgets to see the end RSS unchanged);
* after the load, every replica idle again (no request leaked in an engine) and the same replica
  processes as at the start (none crashed and was replaced).

It prints tables and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import socket
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

APP = "soak"
BASE_NAME = "base"
MiB = 1 << 20
# Good requests are most of the traffic; the rest is split evenly between these kinds.
BAD_KINDS = ("unknown_adapter", "invalid_adapter", "invalid_id", "oversize_prompt", "bad_json")
EXPECTED_STATUS = {"good": 200, "unknown_adapter": 404, "invalid_adapter": 400, "invalid_id": 400, "oversize_prompt": 400, "bad_json": 400}
REFUSALS = (429, 503)  # the intended answers to overload
MAX_PROMPT_CHARS = 4000
REQUEST_TIMEOUT_S = 120.0
WORDS = (
    "river stone light morning adapter latency engineer music garden ocean city library question "
    "answer summary weather travel history science budget schedule mountain bridge lantern orbit"
).split()
# A "small" base model: big enough that adapters weigh something (about 0.6 MB each at rank 8 on
# all projections), small enough that two replicas decode quickly on a laptop CPU.
SMALL_LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0, tie_word_embeddings=True)
# Adapter shapes, cycled: (rank, target projections).
SHAPES = ((8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")), (4, ("q_proj", "v_proj")), (16, ("q_proj", "o_proj", "down_proj")))
MAX_RANK = 16


def register_bench(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add ``soak`` to ``openlora-ray bench``'s subcommands."""
    p = bench_subparsers.add_parser("soak", help="bounded load of good and bad requests on a local cluster: errors, latency, replica memory")
    p.add_argument("--duration", type=float, default=180.0, help="seconds of load (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=30.0, help="first seconds of load; memory at their end is the 'flat' baseline (default: %(default)s)")
    p.add_argument("--concurrency", type=int, default=32, help="concurrent clients, closed loop (default: %(default)s)")
    p.add_argument("--adapters", type=int, default=150, help="distinct PEFT adapters in the store (default: %(default)s)")
    p.add_argument("--model", default="small", help="'small' (a random 4-layer Llama with SmolLM2's tokenizer, built here), 'demo' (SmolLM2-135M-Instruct) or a model folder (default: %(default)s)")
    p.add_argument("--replicas", type=int, default=2, help="model replicas (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=32, help="largest max_tokens of a good request (default: %(default)s)")
    p.add_argument("--bad-fraction", type=float, default=0.2, help="share of bad requests (default: %(default)s)")
    p.add_argument("--host-budget-fraction", type=float, default=0.1, help="each replica's host-RAM tier, as a share of all adapters' bytes (default: %(default)s)")
    p.add_argument("--disk-budget-fraction", type=float, default=0.3, help="the node's disk cache, as a share of all adapters' bytes (default: %(default)s)")
    p.add_argument("--store", choices=["moto", "folder"], default="moto", help="S3 on a local moto server, or a folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-results/soak.json"))
    p.set_defaults(func=run_soak)


@dataclass(frozen=True)
class SoakConfig:
    duration_s: float = 180.0
    warmup_s: float = 30.0
    concurrency: int = 32
    adapters: int = 150
    model: str = "small"
    replicas: int = 2
    max_tokens: int = 32
    bad_fraction: float = 0.2
    host_budget_fraction: float = 0.1
    disk_budget_fraction: float = 0.3
    store: str = "moto"
    seed: int = 0


def run_soak(args: argparse.Namespace) -> int:
    """CLI entry: run, print tables, write JSON; exit status 1 when a target is missed."""
    cfg = SoakConfig(
        duration_s=args.duration, warmup_s=min(args.warmup, args.duration / 2), concurrency=args.concurrency,
        adapters=args.adapters, model=args.model, replicas=args.replicas, max_tokens=args.max_tokens,
        bad_fraction=args.bad_fraction, host_budget_fraction=args.host_budget_fraction,
        disk_budget_fraction=args.disk_budget_fraction, store=args.store, seed=args.seed,
    )
    report = run(cfg)
    _print_report(report)
    from openlora_ray.bench.timing import write_json

    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0 if all(t["ok"] for t in report["targets"].values()) else 1


# ----------------------------------------------------------------------------------- the run
def run(cfg: SoakConfig) -> dict[str, Any]:
    """Set up the cluster, store and adapters, apply the load, check the aftermath, tear down."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, loopback-only cluster
    work = Path(tempfile.mkdtemp(prefix="openlora-soak-"))
    server = None
    ray_started = False
    try:
        model_dir = _model_dir(cfg.model, work)
        store_settings, server = _start_store(cfg.store, work)
        names, adapter_bytes, largest, setup = _publish_adapters(model_dir, store_settings, work, cfg)
        # Budgets well below what all adapters need, but room for a few of the largest at once.
        host_budget = max(4 * largest, int(adapter_bytes * cfg.host_budget_fraction))
        disk_budget = max(8 * largest, int(adapter_bytes * cfg.disk_budget_fraction))
        app_cfg = _app_config(model_dir, store_settings, work / "node-cache", cfg, host_budget, disk_budget)

        import ray
        from ray import serve

        from openlora_ray.serve.app import build

        ray.init(num_cpus=os.cpu_count() or 2, num_gpus=0, include_dashboard=False, log_to_driver=False, namespace="openlora-soak",
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
        ray_started = True
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.monotonic()
        serve.run(build(app_cfg), name=APP, route_prefix="/")
        setup["deploy_s"] = round(time.monotonic() - t0, 2)
        url = f"http://127.0.0.1:{port}"
        log.info("serving on %s; %d adapters (%.1f MiB), host budget %.1f MiB/replica, disk budget %.1f MiB",
                 url, len(names), adapter_bytes / MiB, host_budget / MiB, disk_budget / MiB)

        results, memory = asyncio.run(_load(url, names, cfg))
        after = _aftermath(work / "node-cache", memory)
    finally:
        if ray_started:
            from ray import serve

            serve.shutdown()
            import ray

            ray.shutdown()
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return _summarise(cfg, setup, names, adapter_bytes, host_budget, disk_budget, results, memory, after)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model_dir(model: str, work: Path) -> Path:
    from openlora_ray.model.prepare import prepare_demo_model

    if model == "demo":
        return prepare_demo_model()
    if model != "small":
        return Path(model).expanduser()
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(prepare_demo_model())
    torch.manual_seed(0)
    config = LlamaConfig(**SMALL_LLAMA, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    path = work / "small-llama"
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _start_store(kind: str, work: Path) -> tuple[dict[str, Any], Any]:
    """Store settings for the app (and the moto server behind them, to stop at the end)."""
    if kind == "folder":
        root = work / "store"
        root.mkdir()
        return {"uri": str(root)}, None
    from openlora_ray.store.bench import _start_moto

    server, endpoint = _start_moto()
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="soak",
                 aws_secret_access_key="soak").create_bucket(Bucket="openlora-soak")
    settings = {"uri": "s3://openlora-soak/adapters", "endpoint_url": endpoint, "region": "us-east-1",
                "addressing_style": "path", "access_key_id": "soak", "secret_access_key": "soak"}
    return settings, server


def _publish_adapters(model_dir: Path, store_settings: dict[str, Any], work: Path, cfg: SoakConfig) -> tuple[list[str], int, int, dict[str, Any]]:
    """Real PEFT adapters pushed through validation, plus corrupted ones written behind its back."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from openlora_ray.adapter_format import BaseModelDims
    from openlora_ray.store.settings import StoreSettings
    from openlora_ray.store.store import AdapterStore

    t0 = time.monotonic()
    store = AdapterStore(StoreSettings(**store_settings, cache_dir=work / "push-cache"), dims=BaseModelDims.from_model_dir(model_dir), max_rank=MAX_RANK)
    names = [f"soak-{i:03d}" for i in range(cfg.adapters)]
    total = largest = 0
    gen = torch.Generator().manual_seed(cfg.seed)
    for shape_index, (rank, targets) in enumerate(SHAPES):
        mine = names[shape_index :: len(SHAPES)]
        if not mine:
            continue
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0))
        lora = [p for n, p in peft.named_parameters() if "lora_" in n]
        for name in mine:
            with torch.no_grad():
                for p in lora:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            src = work / "src" / name
            peft.save_pretrained(src, safe_serialization=True)
            manifest = store.push(src, f"{name}@v1")
            total += manifest.total_bytes
            largest = max(largest, manifest.total_bytes)
            shutil.rmtree(src)
    _publish_corrupt(store, model_dir, work)
    return names, total, largest, {"adapters_s": round(time.monotonic() - t0, 2)}


CORRUPT = ("broken-nan", "broken-shapes", "broken-header", "broken-rank")


def _publish_corrupt(store: Any, model_dir: Path, work: Path) -> None:
    import numpy as np
    from peft import LoraConfig, get_peft_model
    from safetensors.numpy import load_file, save_file
    from transformers import AutoModelForCausalLM

    from openlora_ray.adapter_format import CONFIG_FILE, WEIGHTS_FILE
    from openlora_ray.store.manifest import MANIFEST_FILE, build_manifest

    def publish(name: str, folder: Path) -> None:  # what a publisher with its own tooling could do
        base = f"{name}/v1/"
        for fname in (CONFIG_FILE, WEIGHTS_FILE):
            store.backend.write_bytes(base + fname, (folder / fname).read_bytes())
        store.backend.write_bytes(base + MANIFEST_FILE, build_manifest(name, "v1", folder).to_json())

    for name, rank in (("good", 4), ("huge", 64)):
        peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
        peft.save_pretrained(work / "corrupt" / name, safe_serialization=True)
    good = work / "corrupt" / "good"
    tensors = load_file(good / WEIGHTS_FILE)
    for name in CORRUPT:
        folder = work / "corrupt" / name
        if name == "broken-rank":
            publish(name, work / "corrupt" / "huge")
            continue
        folder.mkdir(parents=True)
        shutil.copy(good / CONFIG_FILE, folder / CONFIG_FILE)
        if name == "broken-header":
            raw = (good / WEIGHTS_FILE).read_bytes()
            (folder / WEIGHTS_FILE).write_bytes((1 << 40).to_bytes(8, "little") + raw[8:])
        else:
            bad = dict(tensors)
            key = next(k for k in bad if ("lora_B" if name == "broken-nan" else "lora_A") in k)
            if name == "broken-nan":
                bad[key] = bad[key].copy()
                bad[key][0, 0] = np.nan
            else:
                bad[key] = np.ascontiguousarray(bad[key][:, : bad[key].shape[1] // 2])
            save_file(bad, folder / WEIGHTS_FILE, metadata={"format": "pt"})
        publish(name, folder)


def _app_config(model_dir: Path, store_settings: dict[str, Any], node_cache: Path, cfg: SoakConfig, host_budget: int, disk_budget: int) -> Any:
    from openlora_ray.serve.config import AppConfig

    return AppConfig(
        model=str(model_dir),
        served_model_name=BASE_NAME,
        engine={"num_slots": 8, "max_rank": MAX_RANK, "max_running": 8, "max_queue": 64, "max_seq_len": 512,
                "torch_threads": 1, "host_cache_bytes": host_budget, "memory_budget_bytes": 2 << 30},
        store={**store_settings, "cache_dir": str(node_cache), "cache_bytes": disk_budget, "max_adapter_bytes": disk_budget, "evict_grace_s": 5.0},
        replicas={"num_replicas": cfg.replicas, "num_cpus": 0, "num_gpus": 0, "max_ongoing_requests": 32, "max_queued_requests": 256,
                  "stats_period_s": 1.0, "graceful_shutdown_timeout_s": 2},
        ingress_num_cpus=0,
        auth={"enabled": False},  # loopback only; the per-key limits below would otherwise cap one anonymous client
        limits={"max_prompt_chars": MAX_PROMPT_CHARS, "requests_per_s": 1e6, "burst": 1_000_000, "max_streams": 1_000_000},
    )


# ----------------------------------------------------------------------------------- the load
@dataclass
class Result:
    kind: str
    stream: bool
    status: int  # 0: no HTTP answer (transport error or client timeout)
    outcome: str  # "ok", "refused", or "unexpected: <why>"
    start_s: float  # since the load began
    total_s: float
    ttft_s: float | None = None
    model: str = ""


def _zipf_weights(n: int, s: float = 1.1) -> list[float]:
    return [1.0 / (i + 1) ** s for i in range(n)]


def _request(rng: random.Random, names: list[str], weights: list[float], cfg: SoakConfig) -> tuple[str, str, bytes, bool, str]:
    """(kind, path, body, stream, model) of one random request."""
    roll = rng.random()
    kind = "good" if roll >= cfg.bad_fraction else BAD_KINDS[min(len(BAD_KINDS) - 1, int(roll / cfg.bad_fraction * len(BAD_KINDS)))]
    chat = rng.random() < 0.5
    stream = rng.random() < 0.5
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
    model = BASE_NAME if rng.random() < 0.1 else rng.choices(names, weights)[0]
    if kind == "unknown_adapter":
        model = f"missing-{rng.randrange(10**6)}"
    elif kind == "invalid_adapter":
        model = rng.choice(CORRUPT)
    elif kind == "invalid_id":
        model = rng.choice(("../etc/passwd", "Upper/Case", "a@b@c", "x" * 100, "tenant/../../key"))
    elif kind == "oversize_prompt":
        # Either over the ingress's character limit, or under it but over the engine's context.
        words = "word " * (MAX_PROMPT_CHARS // 5 + 10) if rng.random() < 0.5 else "river stone " * 330
    body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(4, cfg.max_tokens), "stream": stream}
    if rng.random() < 0.7:
        body["temperature"] = 0
    else:
        body.update(temperature=0.8, top_p=0.95, seed=rng.randrange(10**6))
    if chat:
        body["messages"] = [{"role": "user", "content": words}]
    else:
        body["prompt"] = words
    raw = json.dumps(body).encode()
    if kind == "bad_json":
        raw = raw[: rng.randint(1, len(raw) - 1)]  # cut off mid-document
    return kind, "/v1/chat/completions" if chat else "/v1/completions", raw, stream, model


async def _send(session: Any, url: str, kind: str, path: str, raw: bytes, stream: bool, model: str, began: float) -> Result:
    import aiohttp

    start = time.monotonic()
    status, ttft, outcome = 0, None, "ok"
    try:
        async with session.post(url + path, data=raw, headers={"Content-Type": "application/json"}) as resp:
            status = resp.status
            if status == 200 and stream:
                done, finished, errors = False, False, []
                async for line in resp.content:
                    line = line.strip()
                    if not line.startswith(b"data: "):
                        continue
                    ttft = ttft if ttft is not None else time.monotonic() - start
                    payload = line[len(b"data: ") :]
                    if payload == b"[DONE]":
                        done = True
                        break
                    event = json.loads(payload)
                    if "error" in event:
                        errors.append(event["error"].get("code"))
                    finished = finished or any(c.get("finish_reason") for c in event.get("choices", ()))
                if errors or not done or not finished:
                    outcome = f"unexpected: broken stream (error event {errors})" if errors else "unexpected: broken stream (no end)"
            else:
                body = await resp.read()
                if status == 200:
                    answer = json.loads(body)
                    if not answer["choices"][0].get("finish_reason"):
                        outcome = "unexpected: answer without finish_reason"
    except asyncio.TimeoutError:
        outcome = "unexpected: client timeout"
    except aiohttp.ClientError as e:
        outcome = f"unexpected: transport ({type(e).__name__})"
    except (ValueError, KeyError, IndexError) as e:
        outcome = f"unexpected: malformed answer ({type(e).__name__})"
    total = time.monotonic() - start
    if outcome == "ok" and status != EXPECTED_STATUS[kind]:
        outcome = "refused" if status in REFUSALS else f"unexpected: HTTP {status}"
    return Result(kind, stream, status, outcome, start - began, total, ttft, model)


async def _load(url: str, names: list[str], cfg: SoakConfig) -> tuple[list[Result], dict[str, Any]]:
    """``cfg.concurrency`` closed-loop clients until the deadline; memory sampled alongside."""
    import aiohttp

    results: list[Result] = []
    memory: dict[str, Any] = {"samples": [], "start": _replica_rss(), "warm": None}
    weights = _zipf_weights(len(names))
    began = time.monotonic()
    deadline = began + cfg.duration_s

    async def client(i: int, session: Any) -> None:
        rng = random.Random(cfg.seed * 1000 + i)
        while time.monotonic() < deadline:
            results.append(await _send(session, url, *_request(rng, names, weights, cfg), began))

    async def sampler() -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(2.0)
            now = time.monotonic() - began
            rss = await asyncio.to_thread(_replica_rss)
            memory["samples"].append({"t_s": round(now, 1), "rss_mb": {k: v / MiB for k, v in rss.items()}})
            if memory["warm"] is None and now >= cfg.warmup_s:
                memory["warm"] = rss

    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=cfg.concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(sampler(), *(client(i, session) for i in range(cfg.concurrency)))
    memory["end"] = _replica_rss()
    memory["warm"] = memory["warm"] or memory["start"]
    memory["load_s"] = time.monotonic() - began
    return results, memory


def _replica_rss() -> dict[str, int]:
    """RSS in bytes of this cluster's model replicas, keyed by ``pid``.

    The processes are found among this driver's descendants (the raylet it started forks the
    workers), by the process title Ray gives a Serve replica, so other clusters on the machine
    are never counted.
    """
    import psutil

    out = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            if f"ServeReplica:{APP}:LoraReplica" in " ".join(proc.cmdline()):
                out[str(proc.pid)] = proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def _aftermath(node_cache: Path, memory: dict[str, Any]) -> dict[str, Any]:
    """After the load: every replica idle again, what each holds, the disk cache's size."""
    from ray import serve

    handle = serve.get_deployment_handle("LoraReplica", APP)
    deadline = time.monotonic() + 30
    while True:
        states = handle.broadcast("describe").results()
        if all(s["running"] == 0 and s["queued"] == 0 for s in states) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    disk = sum(p.stat().st_size for p in node_cache.rglob("*") if p.is_file() and ".locks" not in p.parts)
    return {
        "replicas": [{k: s[k] for k in ("replica_id", "running", "queued", "free_slots", "num_slots", "loads_by_tier", "evictions")}
                     | {"resident": len(s["resident"]), "host": len(s["host"]), "disk": len(s["disk"])} for s in states],
        "idle": all(s["running"] == 0 and s["queued"] == 0 for s in states),
        "disk_cache_bytes": disk,
        "same_processes": set(memory["start"]) == set(memory["end"]),
    }


# -------------------------------------------------------------------------------- the report
def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = int(k)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (k - lo)


def _percentiles_ms(values: list[float]) -> dict[str, float | None]:
    return {name: (None if v is None else round(v * 1000, 1)) for name, v in
            (("p50", _pct(values, 0.5)), ("p90", _pct(values, 0.9)), ("p99", _pct(values, 0.99)), ("max", max(values) if values else None))}


def _summarise(cfg: SoakConfig, setup: dict[str, Any], names: list[str], adapter_bytes: int, host_budget: int, disk_budget: int,
               results: list[Result], memory: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    by_kind: dict[str, dict[str, Any]] = {}
    for kind in EXPECTED_STATUS:
        mine = [r for r in results if r.kind == kind]
        by_kind[kind] = {
            "expected_status": EXPECTED_STATUS[kind],
            "sent": len(mine),
            "as_expected": sum(r.outcome == "ok" for r in mine),
            "refused_429_503": sum(r.outcome == "refused" for r in mine),
            "unexpected": sum(r.outcome.startswith("unexpected") for r in mine),
            "total_ms": _percentiles_ms([r.total_s for r in mine]),
        }
    unexpected = Counter(f"{r.kind}: {r.outcome.removeprefix('unexpected: ')}" for r in results if r.outcome.startswith("unexpected"))
    good = [r for r in results if r.kind == "good" and r.outcome == "ok"]
    good_sent = by_kind["good"]["sent"]
    mem = {}
    growth_ok, bound_ok = True, True
    for pid in sorted(set(memory["start"]) | set(memory["end"])):
        start, warm, end = (memory[k].get(pid) for k in ("start", "warm", "end"))
        peak = max([s["rss_mb"].get(pid, 0.0) for s in memory["samples"]] + [(end or 0) / MiB])
        row = {"start_mb": _mb(start), "warm_mb": _mb(warm), "end_mb": _mb(end), "peak_mb": round(peak, 1)}
        if None not in (start, warm, end):
            after_warm = end - warm
            row["growth_after_warmup_mb"] = round(after_warm / MiB, 1)
            row["growth_since_start_mb"] = round((end - start) / MiB, 1)
            growth_ok &= after_warm <= max(32 * MiB, 0.05 * warm)
            bound_ok &= end - start <= host_budget + _workspace_slack(start)
        else:
            growth_ok = bound_ok = False
        mem[pid] = row
    distinct = len({r.model for r in results if r.kind == "good" and r.outcome == "ok" and r.model != BASE_NAME})
    targets = {
        "zero_unexpected_errors": {"measured": sum(unexpected.values()), "ok": not unexpected},
        "every_good_request_answered": {"measured": f"{by_kind['good']['as_expected']}/{good_sent}", "ok": good_sent > 0 and by_kind["good"]["as_expected"] == good_sent},
        "memory_flat_after_warmup": {"measured": {p: m.get("growth_after_warmup_mb") for p, m in mem.items()}, "tolerance": "max(32 MiB, 5% of the warm RSS) per replica", "ok": growth_ok and bool(mem)},
        "memory_within_budgets": {"measured": {p: m.get("growth_since_start_mb") for p, m in mem.items()},
                                  "bound_mb": {p: round((host_budget + _workspace_slack(memory["start"].get(p, 0))) / MiB, 1) for p in mem},
                                  "ok": bound_ok and bool(mem), "why": "host-RAM tier budget + max(128 MiB, 10% of the start RSS) for allocator and batch "
                                  f"workspaces (first-use growth that no adapter causes); all adapters together are {adapter_bytes / MiB:.0f} MiB"},
        "replicas_idle_after_load": {"measured": after["idle"], "ok": after["idle"]},
        "no_replica_replaced": {"measured": after["same_processes"], "ok": after["same_processes"]},
        "disk_cache_within_budget": {"measured_mb": round(after["disk_cache_bytes"] / MiB, 1), "budget_mb": round(disk_budget / MiB, 1),
                                     "ok": after["disk_cache_bytes"] <= disk_budget},
    }
    return {
        "benchmark": "soak",
        "config": asdict(cfg),
        "setup": setup,
        "adapters": {"count": len(names), "total_mb": round(adapter_bytes / MiB, 1), "distinct_served": distinct,
                     "host_budget_mb_per_replica": round(host_budget / MiB, 1), "disk_budget_mb": round(disk_budget / MiB, 1)},
        "load_s": round(memory["load_s"], 1),
        "requests": {"sent": len(results), "good_served": len(good), "per_s": round(len(results) / memory["load_s"], 1)},
        "by_kind": by_kind,
        "unexpected": dict(unexpected),
        "latency_ms": {"ttft_stream": _percentiles_ms([r.ttft_s for r in good if r.stream and r.ttft_s is not None]),
                       "total_good": _percentiles_ms([r.total_s for r in good]),
                       "total_good_stream": _percentiles_ms([r.total_s for r in good if r.stream]),
                       "total_good_plain": _percentiles_ms([r.total_s for r in good if not r.stream])},
        "replica_memory": mem,
        "memory_timeline": memory["samples"],
        "aftermath": after,
        "targets": targets,
    }


def _workspace_slack(start_rss: int) -> int:
    """Growth since the start that is not adapters: the allocator's and torch's batch workspaces.

    They grow on first use (a full prefill chunk's logits, a full decode batch) and then stay;
    they scale with the model, hence the share of the start RSS.
    """
    return max(128 * MiB, start_rss // 10)


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / MiB, 1)


def _print_report(report: dict[str, Any]) -> None:
    from openlora_ray.bench.timing import print_table

    a, r = report["adapters"], report["requests"]
    print(f"soak: {report['load_s']} s, {report['config']['concurrency']} clients, {r['sent']} requests ({r['per_s']}/s), "
          f"{a['count']} adapters ({a['total_mb']} MiB; {a['distinct_served']} distinct served), host budget {a['host_budget_mb_per_replica']} MiB/replica, "
          f"disk budget {a['disk_budget_mb']} MiB")
    print_table(["kind", "expect", "sent", "as expected", "429/503", "unexpected", "p50 ms", "p99 ms"],
                [[k, v["expected_status"], v["sent"], v["as_expected"], v["refused_429_503"], v["unexpected"], v["total_ms"]["p50"], v["total_ms"]["p99"]]
                 for k, v in report["by_kind"].items()])
    for what, n in report["unexpected"].items():
        print(f"  unexpected: {what} x{n}")
    print()
    print_table(["latency (good)", "p50 ms", "p90 ms", "p99 ms", "max ms"],
                [[k, v["p50"], v["p90"], v["p99"], v["max"]] for k, v in report["latency_ms"].items()])
    print()
    print_table(["replica pid", "start MiB", "warm MiB", "end MiB", "peak MiB", "after warm-up MiB", "since start MiB"],
                [[pid, m["start_mb"], m["warm_mb"], m["end_mb"], m["peak_mb"], m.get("growth_after_warmup_mb"), m.get("growth_since_start_mb")]
                 for pid, m in report["replica_memory"].items()])
    print()
    for name, t in report["targets"].items():
        shown = t.get("measured", t.get("measured_mb"))
        print(f"{name}: {shown} {'ok' if t['ok'] else 'MISSED'}")

