"""``openlora-ray bench ...``: benchmarks that print a table and write JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from openlora_ray.store.bench import register_bench as register_store_bench


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("bench", help="benchmarks (ratios against baselines measured in the same run)")
    benches = group.add_subparsers(dest="bench", required=True)
    lora = benches.add_parser("lora", help="mixed-adapter forward vs base-only vs PEFT")
    lora.add_argument("--model", type=Path, default=None, help="model folder (default: the prepared demo model)")
    lora.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: %(default)s)")
    lora.add_argument("--rows", type=int, default=16, help="batch rows, each with its own adapter")
    lora.add_argument("--context", type=int, default=32, help="prefill length / decode context")
    lora.add_argument("--iters", type=int, default=10, help="calls per timing block (decode; prefill uses a fifth)")
    lora.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    lora.add_argument("--out", type=Path, default=Path("bench-results/lora.json"))
    lora.set_defaults(func=_lora)
    register_store_bench(benches)


def _lora(args: argparse.Namespace) -> int:
    import torch

    from openlora_ray.bench.lora_bench import run
    from openlora_ray.model.loader import resolve_dtype
    from openlora_ray.model.prepare import prepare_demo_model

    model = args.model or prepare_demo_model()
    run(model, resolve_dtype(args.dtype, torch.device("cpu")), args.rows, args.context, args.iters, args.repeats, args.out)
    return 0
