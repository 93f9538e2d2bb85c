"""``openlora-ray bench kv``: what the paged KV cache and the prefix cache buy, in one run.

(a) Memory. The engine before the paged cache gave every running request one KV row of
``max_seq_len`` tokens. At the KV memory of its defaults (16 rows x 1,024 tokens = 16,384 tokens)
both engines serve the same seeded mix of prompt lengths (lognormal, 20-2,000 tokens) and output
lengths (10-500) over 16 adapters: the fixed-row engine fits ``16,384 / max_seq_len`` requests
at once, the paged one as many as their real lengths allow. The fixed-row engine is the code as it
was at ``FIXED_ROW_ENGINE`` (extracted from git into a temporary folder), driven by the same
script (``kv_driver.py``); sequences in flight are sampled while the workload runs.

(b) Prefix cache. 16 adapters, each with its own 600-token system prompt, short user turns,
Poisson arrivals: the paged engine with the prefix cache on and off. Before the clock starts each
adapter's system prompt has been served once (the steady state of a fine-tune whose every
conversation starts with it; without it, the first request per adapter is a miss whatever the
cache, and a 32-request run would measure mostly those).

"In flight" is the running batch sampled every 50 ms while requests wait in the queue: how many
sequences an engine holds at once when demand exceeds it (the mean over the whole run also counts
the tail, when the last long answers run alone).

Every system runs in a fresh process. The printed bound for (a) is what no scheduler can beat:
the paged engine runs at most ``min(max_running, KV tokens / mean tokens per sequence)``
sequences, the fixed-row one exactly ``KV tokens / max_seq_len``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openlora_ray.bench.lora_bench import ALL_LINEAR, Shape, _make_peft_adapters
from openlora_ray.bench.timing import cpu_model, print_table, write_json
from openlora_ray.errors import OpenLoraError
from openlora_ray.model.loader import load_hf_model

log = logging.getLogger(__name__)

FIXED_ROW_ENGINE = "72ca503dc4088915e1afb9e8543fbd23d7c4b741"  # the last commit whose engine gave each request a max_seq_len KV row
TARGET_IN_FLIGHT_X = 3.0
TARGET_MIX_THROUGHPUT_X = 1.5
TARGET_TTFT_P50_X = 3.0
TARGET_PREFIX_THROUGHPUT_X = 2.0
DRIVER = Path(__file__).with_name("kv_driver.py")
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class KvBenchConfig:
    kv_tokens: int = 16 * 1024  # the fixed-row engine's defaults: 16 rows x 1,024 tokens
    max_seq_len: int = 2560  # a 2,000-token prompt plus a 500-token answer
    paged_max_running: int = 64
    block_size: int = 16
    adapters: int = 16
    mix_requests: int = 24  # sized so that the fixed-row baseline finishes in minutes on 2 cores
    mix_rate_per_s: float = 8.0
    prompt_range: tuple[int, int] = (20, 2000)
    prompt_median: int = 200
    output_range: tuple[int, int] = (10, 500)
    output_median: int = 64
    shared_requests: int = 32
    shared_rate_per_s: float = 4.0
    system_tokens: int = 600
    user_range: tuple[int, int] = (8, 40)
    shared_new_tokens: int = 32
    seed: int = 0


def _lognormal(rng: random.Random, median: int, bounds: tuple[int, int]) -> int:
    return int(min(bounds[1], max(bounds[0], rng.lognormvariate(math.log(median), 1.0))))


def _arrivals(rng: random.Random, n: int, rate: float) -> list[float]:
    out, t = [], 0.0
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def mix_workload(cfg: KvBenchConfig, vocab: int) -> list[dict[str, Any]]:
    rng = random.Random(cfg.seed)
    arrivals = _arrivals(rng, cfg.mix_requests, cfg.mix_rate_per_s)
    return [
        {
            "prompt": [rng.randrange(100, vocab) for _ in range(_lognormal(rng, cfg.prompt_median, cfg.prompt_range))],
            "adapter": f"a{i % cfg.adapters}",
            "max_tokens": _lognormal(rng, cfg.output_median, cfg.output_range),
            "arrival_s": t,
        }
        for i, t in enumerate(arrivals)
    ]


def shared_prefix_workload(cfg: KvBenchConfig, vocab: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(warm-up: each adapter's system prompt once, the measured requests)."""
    rng = random.Random(cfg.seed + 1)
    systems = [[rng.randrange(100, vocab) for _ in range(cfg.system_tokens)] for _ in range(cfg.adapters)]
    warmup = [{"prompt": system, "adapter": f"a{a}"} for a, system in enumerate(systems)]
    requests = []
    for t in _arrivals(rng, cfg.shared_requests, cfg.shared_rate_per_s):
        a = rng.randrange(cfg.adapters)
        user = [rng.randrange(100, vocab) for _ in range(rng.randint(*cfg.user_range))]
        requests.append({"prompt": systems[a] + user, "adapter": f"a{a}", "max_tokens": cfg.shared_new_tokens, "arrival_s": t})
    return warmup, requests


def extract_fixed_row_engine(dest: Path) -> Path:
    """The package as of ``FIXED_ROW_ENGINE``, from this checkout's git history."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", FIXED_ROW_ENGINE, "openlora_ray"], check=True, capture_output=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise OpenLoraError(f"the fixed-row baseline needs a git checkout of openlora-ray with commit {FIXED_ROW_ENGINE}: {e}") from e
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def run_system(
    tree: Path, engine: dict[str, Any], adapters: dict[str, str], requests: list[dict], work: Path, name: str, warmup: list[dict] = ()
) -> dict[str, Any]:
    """One system in a fresh process, importing ``openlora_ray`` from ``tree``."""
    spec, out = work / f"{name}.spec.json", work / f"{name}.out.json"
    payload = {"engine": engine, "adapters": adapters, "requests": requests, "warmup": list(warmup), "sample_period_s": 0.05}
    spec.write_text(json.dumps(payload))
    log.info("running %s", name)
    subprocess.run([sys.executable, str(DRIVER), str(spec), str(out)], check=True, env={**os.environ, "PYTHONPATH": str(tree)})
    raw = json.loads(out.read_text())
    if not Path(raw["engine_source"]).is_relative_to(tree):
        raise OpenLoraError(f"{name} imported its engine from {raw['engine_source']}, not from {tree}")
    ttft = [r["ttft_s"] for r in raw["requests"]]
    tokens = sum(r["tokens"] for r in raw["requests"])
    samples = raw["in_flight"] or [[0, 0]]
    busy = [running for running, _ in samples]
    # in flight while requests wait behind running ones; a sample that caught a request waiting
    # with nothing running is the loop's admission lag (a short run may have only those)
    backlog = [running for running, queued in samples if queued > 0 and running > 0] or busy
    return {
        "system": name,
        "tokens_per_s": tokens / raw["makespan_s"],
        "makespan_s": raw["makespan_s"],
        "in_flight_backlog": float(np.mean(backlog)),
        "in_flight_mean": float(np.mean(busy)),
        "in_flight_max": int(max(busy)),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "preemptions": raw["preemptions"],
        "prefix_hit_rate": raw["prefix_hit_rate"],
        "engine_source": raw["engine_source"],
    }


def run(model_dir: Path, cfg: KvBenchConfig, out: Path, threads: int | None) -> dict[str, Any]:
    hf = load_hf_model(model_dir, torch.float32)
    vocab = hf.config.vocab_size
    mix = mix_workload(cfg, vocab)
    warmup, shared = shared_prefix_workload(cfg, vocab)
    common = {"model_path": str(model_dir), "num_slots": cfg.adapters, "max_rank": 16, "max_seq_len": cfg.max_seq_len, "torch_threads": threads}
    fixed_rows = cfg.kv_tokens // cfg.max_seq_len
    paged = {**common, "kv_block_size": cfg.block_size, "num_kv_blocks": cfg.kv_tokens // cfg.block_size}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _make_peft_adapters(hf, Shape("r16-all", 16, ALL_LINEAR), cfg.adapters, work / "adapters", seed=cfg.seed)
        del hf
        adapters = {f"a{i}": str(work / "adapters" / f"a{i}") for i in range(cfg.adapters)}
        old_tree = extract_fixed_row_engine(work / "fixed-row")
        n_mix, n_shared = len(mix), len(shared)
        memory = [
            run_system(old_tree, {**common, "max_running": fixed_rows, "max_queue": n_mix}, adapters, mix, work, "fixed-row"),
            run_system(REPO, {**paged, "max_running": cfg.paged_max_running, "max_queue": n_mix}, adapters, mix, work, "paged"),
        ]
        prefix = [
            run_system(REPO, {**paged, "max_running": 32, "max_queue": n_shared, "prefix_cache": False}, adapters, shared, work, "prefix-off", warmup),
            run_system(REPO, {**paged, "max_running": 32, "max_queue": n_shared, "prefix_cache": True}, adapters, shared, work, "prefix-on", warmup),
        ]
    mean_len = float(np.mean([len(r["prompt"]) + r["max_tokens"] for r in mix]))
    bound_in_flight = min(cfg.paged_max_running, cfg.kv_tokens / mean_len) / fixed_rows
    report = {
        "benchmark": "kv",
        "machine": cpu_model(),
        "threads": threads or torch.get_num_threads(),
        "config": asdict(cfg),
        "fixed_row_engine": FIXED_ROW_ENGINE,
        "fixed_rows": fixed_rows,
        "memory": memory,
        "prefix": prefix,
        "in_flight_x": memory[1]["in_flight_backlog"] / memory[0]["in_flight_backlog"],
        "in_flight_bound_x": bound_in_flight,
        "mix_throughput_x": memory[1]["tokens_per_s"] / memory[0]["tokens_per_s"],
        "ttft_p50_x": prefix[0]["ttft_p50_s"] / prefix[1]["ttft_p50_s"],
        "prefix_throughput_x": prefix[1]["tokens_per_s"] / prefix[0]["tokens_per_s"],
    }
    write_json(out, report)
    _print(report)
    return report


def _print(r: dict[str, Any]) -> None:
    cfg = r["config"]
    print(f"bench kv on {r['machine']}, {r['threads']} threads; KV memory {cfg['kv_tokens']} tokens for every system")
    headers = ["system", "tok/s", "in flight (backlog)", "in flight mean", "max", "TTFT p50 s", "TTFT p99 s", "preempted", "prefix hits"]
    rows = [
        [
            s["system"], s["tokens_per_s"], s["in_flight_backlog"], s["in_flight_mean"], s["in_flight_max"],
            s["ttft_p50_s"], s["ttft_p99_s"], s["preemptions"], s["prefix_hit_rate"],
        ]
        for s in r["memory"] + r["prefix"]
    ]
    print_table(headers, rows)

    def verdict(value: float, target: float) -> str:
        return f"{value:.2f}x (target {target}x: {'met' if value >= target else 'MISSED'})"

    print(f"(a) {r['fixed_rows']} fixed rows of {cfg['max_seq_len']} tokens vs paged blocks of {cfg['block_size']}:")
    print(f"    sequences in flight {verdict(r['in_flight_x'], TARGET_IN_FLIGHT_X)}; bound {r['in_flight_bound_x']:.2f}x")
    print(f"    throughput {verdict(r['mix_throughput_x'], TARGET_MIX_THROUGHPUT_X)}")
    print(f"(b) prefix cache on vs off: TTFT p50 {verdict(r['ttft_p50_x'], TARGET_TTFT_P50_X)}, throughput {verdict(r['prefix_throughput_x'], TARGET_PREFIX_THROUGHPUT_X)}")
