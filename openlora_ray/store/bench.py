"""``openlora-ray bench store``: what fetching an adapter costs, cold and warm.

Measures, for a rank-16 adapter of SmolLM2-135M on all seven projections (about 20 MB in float32):

* the raw GET of the weights object (the transfer floor),
* cold fetch: ``AdapterStore.resolve(name@version)`` with an empty cache, i.e. manifest GET,
  two object GETs hashed while written, sha256 check, header validation, NaN/Inf scan, rename,
* warm resolve: the same call on a cached version (no network), and
* warm load: warm resolve plus reading the tensors into host RAM (safetensors, numpy).

By default the store is a moto S3 server started on 127.0.0.1 (needs ``moto[server]``, a test
dependency); ``--endpoint-url`` and ``--bucket`` point it at a real MinIO or S3 instead.

The last step, host tier to slot, is torch work: the caller passes it in as ``slot_copy`` (the
CLI wires the model core's measurement), so this module stays free of torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from openlora_ray.adapter_format import CONFIG_FILE, PROJECTIONS, WEIGHTS_FILE, BaseModelDims
from openlora_ray.errors import OpenLoraError
from openlora_ray.store.listing_bench import register_listing_bench

log = logging.getLogger(__name__)

# SmolLM2-135M(-Instruct)'s config.json, the demo base model.
SMOLLM2_135M = BaseModelDims(
    hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64
)
TARGETS = {"cold_p50_ms": 150.0, "cold_p99_ms": 500.0, "warm_load_p50_ms": 50.0, "host_to_slot_p50_ms": 5.0}

# (adapter folder, base model folder or None for SmolLM2, rank) -> one copy into a slot, ready to time
SlotCopy = Callable[[Path, "Path | None", int], Callable[[], object]]


def register_bench(bench_subparsers: argparse._SubParsersAction, slot_copy: SlotCopy | None = None) -> None:
    """Add ``store`` to ``openlora-ray bench``'s subcommands (``slot_copy``: see the module doc)."""
    p = bench_subparsers.add_parser("store", help="adapter store: cold fetch and warm load latency")
    p.add_argument("--iters", type=int, default=40, help="fetches per measurement (default: %(default)s)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default: %(default)s)")
    p.add_argument("--model-dir", type=Path, help="base model folder (config.json) instead of SmolLM2-135M's dims")
    p.add_argument("--endpoint-url", help="benchmark against this S3 endpoint instead of a local moto server")
    p.add_argument("--bucket", default="openlora-bench", help="bucket to use (created if absent)")
    p.add_argument("--out", type=Path, default=Path("bench-results/store.json"))
    p.set_defaults(func=lambda args: run_store_bench(args, slot_copy))
    register_listing_bench(bench_subparsers)


def write_adapter(folder: Path, dims: BaseModelDims, rank: int, seed: int = 0) -> int:
    """A PEFT-layout LoRA adapter with random float32 weights (numpy only); returns its bytes."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(dims.num_layers):
        for proj in PROJECTIONS:
            fan_in, fan_out = dims.in_out(proj)
            kind = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            base = f"base_model.model.model.layers.{layer}.{kind}.{proj}"
            tensors[f"{base}.lora_A.weight"] = rng.standard_normal((rank, fan_in), dtype=np.float32) * 0.01
            tensors[f"{base}.lora_B.weight"] = rng.standard_normal((fan_out, rank), dtype=np.float32) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(PROJECTIONS),
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "task_type": "CAUSAL_LM",
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    return sum((folder / f).stat().st_size for f in (CONFIG_FILE, WEIGHTS_FILE))


def _timed(fn: Callable[[], object], iters: int, before: Callable[[], object] | None = None) -> list[float]:
    out = []
    for _ in range(iters):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    k = (len(s) - 1) * q
    lo = int(k)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (k - lo)


def run_store_bench(args: argparse.Namespace, slot_copy: SlotCopy | None = None) -> int:
    """Run the benchmark, print a table and write JSON to ``args.out``."""
    from safetensors.numpy import load_file

    from openlora_ray.bench.timing import print_table, write_json
    from openlora_ray.store.settings import StoreSettings
    from openlora_ray.store.store import AdapterStore

    dims = BaseModelDims.from_model_dir(args.model_dir) if args.model_dir else SMOLLM2_135M
    work = Path(tempfile.mkdtemp(prefix="openlora-bench-store-"))
    server = None
    try:
        endpoint, creds = args.endpoint_url, {}
        if endpoint is None:
            server, endpoint = _start_moto()
            creds = {"access_key_id": "bench", "secret_access_key": "bench"}
        size = write_adapter(work / "adapter", dims, args.rank)

        def store(cache: Path) -> AdapterStore:
            settings = StoreSettings(
                uri=f"s3://{args.bucket}/bench", endpoint_url=endpoint, region="us-east-1",
                addressing_style="path", cache_dir=cache, **creds,
            )
            return AdapterStore(settings, dims=dims, max_rank=args.rank)

        pusher = store(work / "push-cache")
        _ensure_bucket(pusher)
        version = f"r{args.rank}-{os.getpid()}-{time.time_ns()}"
        pusher.push(work / "adapter", f"bench@{version}")
        aid = f"bench@{version}"
        key = f"bench/bench/{version}/{WEIGHTS_FILE}"
        client = pusher.backend.client

        raw = _timed(lambda: client.get_object(Bucket=args.bucket, Key=key)["Body"].read(), args.iters)

        caches = iter(range(args.iters))
        fresh: dict[str, AdapterStore] = {}

        def new_cold_store() -> None:
            # Untimed: drop the previous cold cache (a node's cache is bounded; 40 x 20 MB of
            # dirty pages piling up would measure the kernel's writeback throttling instead).
            if "s" in fresh:
                shutil.rmtree(fresh["s"].cache.root, ignore_errors=True)
            fresh["s"] = store(work / f"cold-{next(caches)}")

        cold = _timed(lambda: fresh["s"].resolve(aid), args.iters, before=new_cold_store)
        warm_store = store(work / "warm-cache")
        warm_store.resolve(aid)
        warm = _timed(lambda: warm_store.resolve(aid), args.iters)
        warm_load = _timed(lambda: load_file(warm_store.resolve(aid) / WEIGHTS_FILE), args.iters)
        to_slot = _timed(slot_copy(warm_store.resolve(aid), args.model_dir, args.rank), args.iters) if slot_copy else []
        pusher.delete(aid)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)

    rows, results = [], {}
    measured = [("raw GET of weights", raw), ("cold fetch (resolve, empty cache)", cold),
                ("warm resolve (cache hit)", warm), ("warm load (resolve + tensors to RAM)", warm_load)]
    if to_slot:
        measured.append(("host tier -> slot copy", to_slot))
    for name, samples in measured:
        p50, p99 = _pct(samples, 0.5), _pct(samples, 0.99)
        rows.append([name, p50, p99, statistics.mean(samples)])
        results[name] = {"p50_ms": p50, "p99_ms": p99, "mean_ms": statistics.mean(samples), "samples": len(samples)}
    print(f"adapter: rank {args.rank}, {size / 1e6:.1f} MB, {len(PROJECTIONS)} projections x {dims.num_layers} layers; "
          f"store: {'local moto server' if server is not None else endpoint}; {args.iters} iterations")
    print_table(["measurement", "p50 ms", "p99 ms", "mean ms"], rows)
    checks = {
        "cold_p50_ms": results["cold fetch (resolve, empty cache)"]["p50_ms"],
        "cold_p99_ms": results["cold fetch (resolve, empty cache)"]["p99_ms"],
        "warm_load_p50_ms": results["warm load (resolve + tensors to RAM)"]["p50_ms"],
    }
    if to_slot:
        checks["host_to_slot_p50_ms"] = results["host tier -> slot copy"]["p50_ms"]
    verdicts = {k: {"measured": v, "target": TARGETS[k], "ok": v < TARGETS[k]} for k, v in checks.items()}
    for k, v in verdicts.items():
        print(f"{k}: {v['measured']:.1f} ms (target < {v['target']:.0f} ms) {'ok' if v['ok'] else 'MISSED'}")
    write_json(args.out, {
        "benchmark": "store", "adapter_bytes": size, "rank": args.rank, "iters": args.iters,
        "store": "moto (127.0.0.1)" if server is not None else endpoint, "results": results, "targets": verdicts,
    })
    print(f"wrote {args.out}")
    return 0


def _start_moto():
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        raise OpenLoraError(
            "bench store needs moto[server] for its local S3 server (pip install -e '.[test]'), "
            "or --endpoint-url of a running MinIO/S3"
        ) from e
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def _ensure_bucket(store) -> None:
    client, bucket = store.backend.client, store.backend.root.bucket
    try:
        client.head_bucket(Bucket=bucket)
    except client.exceptions.ClientError:
        client.create_bucket(Bucket=bucket)
