"""``openlora-ray bench ...``: benchmarks that print a table and write JSON."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from openlora_ray.bench.routing_bench import register_bench as register_routing_bench
from openlora_ray.bench.soak import register_bench as register_soak
from openlora_ray.model.prepare import MODELS
from openlora_ray.serve.simulate import register_bench as register_routing_sim
from openlora_ray.store.bench import register_bench as register_store_bench


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("bench", help="benchmarks (ratios against baselines measured in the same run)")
    benches = group.add_subparsers(dest="bench", required=True)
    lora = benches.add_parser("lora", help="mixed-adapter forward vs base-only vs PEFT")
    _add_model_argument(lora)
    lora.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: %(default)s)")
    lora.add_argument("--rows", type=int, default=16, help="batch rows, each with its own adapter")
    lora.add_argument("--context", type=int, default=32, help="prefill length / decode context")
    lora.add_argument("--iters", type=int, default=10, help="calls per timing block (decode; prefill uses a fifth)")
    lora.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    lora.add_argument("--out", type=Path, default=Path("bench-results/lora.json"))
    lora.set_defaults(func=_lora)
    engine = benches.add_parser("engine", help="generation engine vs PEFT (grouped, mixed) and transformers generate")
    _add_model_argument(engine)
    engine.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: %(default)s)")
    engine.add_argument("--shape", choices=["r16-all", "r8-qv"], default="r16-all", help="adapter rank and projections (default: %(default)s)")
    engine.add_argument("--requests", type=int, default=32, help="requests in the workload (default: %(default)s)")
    engine.add_argument("--adapters", type=int, default=16, help="distinct adapters the requests use (default: %(default)s)")
    engine.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per request, EOS ignored (default: %(default)s)")
    engine.add_argument("--min-prompt", type=int, default=16, help="shortest prompt in tokens (default: %(default)s)")
    engine.add_argument("--max-prompt", type=int, default=128, help="longest prompt in tokens (default: %(default)s)")
    engine.add_argument("--rate", type=float, default=8.0, help="Poisson arrivals per second (default: %(default)s)")
    engine.add_argument("--max-running", type=int, nargs="+", default=[32, 48], help="engine batch sizes to try; the best is compared (default: 32 48)")
    engine.add_argument("--seed", type=int, default=0)
    engine.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: torch's own); 1 keeps the comparison fair on an oversubscribed machine, "
        "where threads waiting at OpenMP barriers slow many-small-op baselines far more than the engine",
    )
    engine.add_argument("--out", type=Path, default=Path("bench-results/engine.json"))
    engine.set_defaults(func=_engine)
    kv = benches.add_parser("kv", help="paged KV cache vs the fixed-row engine; prefix cache on vs off")
    _add_model_argument(kv)
    kv.add_argument("--mix-requests", type=int, default=24, help="requests of the length mix, (a) (default: %(default)s)")
    kv.add_argument("--shared-requests", type=int, default=32, help="requests with adapter system prompts, (b) (default: %(default)s)")
    kv.add_argument("--seed", type=int, default=0)
    kv.add_argument("--threads", type=int, default=None, help="torch CPU threads per system (default: torch's own)")
    kv.add_argument("--out", type=Path, default=Path("bench-results/kv.json"))
    kv.set_defaults(func=_kv)
    register_store_bench(benches, _slot_copy)
    register_routing_bench(benches)
    register_routing_sim(benches)
    register_soak(benches)
    scaling = benches.add_parser("scaling", help="one engine from 5 to 2,000 adapters: throughput, TTFT, tier loads, RSS")
    _add_model_argument(scaling)
    scaling.add_argument("--counts", type=int, nargs="+", default=[5, 100, 1000, 2000], help="adapter counts N (default: %(default)s)")
    scaling.add_argument("--requests", type=int, default=128, help="requests per N and distribution (default: %(default)s)")
    scaling.add_argument("--concurrency", type=int, default=48, help="closed-loop clients (default: %(default)s)")
    scaling.add_argument("--slots", type=int, default=32, help="LoRA slots (default: %(default)s)")
    scaling.add_argument("--max-running", type=int, default=32, help="engine batch, at most (default: %(default)s)")
    scaling.add_argument("--host-cache-mib", type=int, default=256, help="host tier budget (default: %(default)s)")
    scaling.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    scaling.add_argument(
        "--repeats", type=int, default=1,
        help="runs of every configuration, interleaved; the loss is their median (default: %(default)s)",
    )
    scaling.add_argument(
        "--lora-ops", nargs="+", choices=("auto", "kernel", "bmm"), default=["auto"],
        help="LoRA ops to compare, each run beside the others in every repeat (OPENLORA_RAY_LORA_KERNEL; the "
             "first is the headline) (default: %(default)s)",
    )
    scaling.add_argument("--seed", type=int, default=0)
    scaling.add_argument("--cache-dir", type=Path, default=Path("~/.cache/openlora-ray/bench-scaling"), help="generated adapters and the node cache, kept for reruns (default: %(default)s)")
    scaling.add_argument("--out", type=Path, default=Path("bench-results/scaling.json"))
    scaling.set_defaults(func=_scaling)


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    """``--model``: a model folder or a name of ``model prepare`` (resolved by ``resolve_model``)."""
    parser.add_argument(
        "--model", default=None,
        help=f"model folder, or one of {', '.join(MODELS)} (prepared on first use) (default: the demo model)",
    )


def _lora(args: argparse.Namespace) -> int:
    import torch

    from openlora_ray.bench.lora_bench import run
    from openlora_ray.model.loader import resolve_dtype
    from openlora_ray.model.prepare import resolve_model

    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    run(resolve_model(args.model), dtype, args.rows, args.context, args.iters, args.repeats, args.out)
    return 0


def _engine(args: argparse.Namespace) -> int:
    import torch

    from openlora_ray.bench.engine_bench import EngineBenchConfig, run
    from openlora_ray.bench.lora_bench import SHAPES
    from openlora_ray.model.loader import resolve_dtype
    from openlora_ray.model.prepare import resolve_model

    cfg = EngineBenchConfig(
        shape=next(s for s in SHAPES if s.name == args.shape),
        requests=args.requests,
        adapters=args.adapters,
        new_tokens=args.new_tokens,
        min_prompt=args.min_prompt,
        max_prompt=args.max_prompt,
        rate_per_s=args.rate,
        max_running=tuple(args.max_running),
        seed=args.seed,
    )
    run(resolve_model(args.model), resolve_dtype(args.dtype, torch.device("cpu")), cfg, args.out, args.threads)
    return 0


def _kv(args: argparse.Namespace) -> int:
    from openlora_ray.bench.kv_bench import KvBenchConfig, run
    from openlora_ray.model.prepare import resolve_model

    cfg = KvBenchConfig(mix_requests=args.mix_requests, shared_requests=args.shared_requests, seed=args.seed)
    run(resolve_model(args.model), cfg, args.out, args.threads)
    return 0


def _scaling(args: argparse.Namespace) -> int:
    from openlora_ray.bench.scaling_bench import ScalingConfig, run
    from openlora_ray.model.prepare import resolve_model

    if args.requests <= args.concurrency:  # the steady window ends when the last request is sent
        print(f"--requests ({args.requests}) must exceed --concurrency ({args.concurrency}): with every request sent "
              "at once there is no steady throughput to compare", file=sys.stderr)
        return 2
    cfg = ScalingConfig(
        counts=tuple(args.counts), requests=args.requests, concurrency=args.concurrency, num_slots=args.slots,
        max_running=args.max_running, host_cache_mib=args.host_cache_mib, threads=args.threads, seed=args.seed,
        repeats=args.repeats, lora_ops=tuple(args.lora_ops),
    )
    run(resolve_model(args.model), cfg, args.out, args.cache_dir)
    return 0


def _slot_copy(adapter_dir: Path, model_dir: Path | None, rank: int) -> Callable[[], None]:
    """``bench store``'s last step, host tier to slot: the model core's copy (torch)."""
    from openlora_ray.bench.lora_bench import slot_copier
    from openlora_ray.model.prepare import prepare_demo_model

    return slot_copier(model_dir or prepare_demo_model(), adapter_dir, rank)
