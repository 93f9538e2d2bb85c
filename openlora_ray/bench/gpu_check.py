"""``make gpu-check``: the GPU path's correctness checks and decode figures, in one run.

On a GPU machine (``--device auto`` finds CUDA): the checks of ``bench/gpu_checks.py`` on a small
random model, then decode steps of a Llama-3.1-8B-shaped random model in bfloat16
(``bench/gpu_decode.py``), in well under 8 minutes on an H200. On CPU (CI, through
tests/bench/test_gpu_check.py) the same run on a tiny model is a smoke test of a minute or less, so
the script cannot rot between GPU sessions. Prints a table naming the device, writes JSON, exits
non-zero when a check fails.

Run as ``python -m openlora_ray.bench.gpu_check``: it needs neither Ray nor the CLI's other
commands (the GPU machine has no Ray; scripts/gpu-check installs the wheels it lacks).
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from pathlib import Path

import torch

from openlora_ray.bench.gpu_checks import run_checks
from openlora_ray.bench.gpu_decode import SIZES, DecodeSetup, build_model, copy_bandwidth, run_decode, summarise
from openlora_ray.bench.timing import cpu_model, print_table, write_json

log = logging.getLogger(__name__)

TARGETS = {"mixed_vs_base": 0.85, "base_fraction_of_bound": 0.60}  # issue 13, on the H200


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    return f"{cpu_model()} ({platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads)"


def run(device: torch.device, size: str, setup: DecodeSetup, out: Path, checks: bool = True) -> dict:
    started = time.perf_counter()
    results = run_checks(device) if checks else []
    checks_s = time.perf_counter() - started
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # one slot per row, and a spare one that the slot-load figures write into while rows decode
    model = build_model(SIZES[size], dtype, device, num_slots=setup.rows + 1, max_rank=setup.rank)
    bandwidth = copy_bandwidth(device, (4 << 30) if device.type == "cuda" else (64 << 20))
    decode = run_decode(model, setup, graphs=device.type == "cuda")
    lines = summarise(decode, setup, bandwidth)
    report = {
        "benchmark": "gpu-check",
        "device": device_name(device),
        "device_type": device.type,
        "size": size,
        "dtype": str(dtype).removeprefix("torch."),
        "setup": vars(setup),
        "copy_bandwidth_bytes_per_s": bandwidth,
        "checks": [vars(r) for r in results],
        "decode": decode,
        "summary": lines,
        "targets": TARGETS,
        "seconds": {"checks": checks_s, "total": time.perf_counter() - started},
    }
    write_json(out, report)
    _print(report)
    return report


def _print(report: dict) -> None:
    print(f"gpu-check on {report['device']}")
    if report["checks"]:
        print_table(
            ["check", "result", "detail"], [[c["name"], c["status"], c["detail"][:150]] for c in report["checks"]]
        )
        print()
    s = report["setup"]
    bandwidth = report["copy_bandwidth_bytes_per_s"] / 1e9
    print(
        f"decode: {report['size']} model, {report['dtype']}, {s['rows']} rows x {s['rows']} distinct "
        f"rank-{s['rank']} adapters on all projections, context {s['context']}; copy bandwidth {bandwidth:.1f} GB/s "
        f"(read + write); targets: mixed/base >= {TARGETS['mixed_vs_base']}, "
        f"base >= {TARGETS['base_fraction_of_bound']:.0%} of the bound"
    )
    print_table(
        [
            "runner",
            "base ms/step",
            "mixed ms/step",
            "base tok/s",
            "mixed tok/s",
            "mixed/base",
            "base of bound",
            "mixed of bound",
        ],
        [
            [
                r["runner"],
                r["base_ms"],
                r["mixed_ms"],
                r["base_tokens_per_s"],
                r["mixed_tokens_per_s"],
                r["mixed_vs_base"],
                r["base_fraction_of_bound"],
                r["mixed_fraction_of_bound"],
            ]
            for r in report["summary"]
        ],
    )
    load = report["decode"]["slot_load"]
    path = "pinned, side stream" if report["device_type"] == "cuda" else "inline"
    print(
        f"slot load of one adapter ({load['adapter_bytes'] / 2**20:.1f} MiB) from the host tier: pageable, inline "
        f"{load['pageable_inline_ms']:.2f} ms; {path} "
        f"{load['transfer_ms']:.2f} ms. Mixed decode step alone {load['step_alone_ms']:.2f} ms, with that load "
        f"queued beside it {load['step_with_load_ms']:.2f} ms"
    )
    print(f"checks {report['seconds']['checks']:.0f} s, total {report['seconds']['total']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cuda, cuda:N or cpu")
    parser.add_argument(
        "--size", choices=sorted(SIZES), default=None, help="decode model: 8b on CUDA, tiny on CPU by default"
    )
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--context", type=int, default=None, help="cached tokens per row (256 on CUDA, 32 on CPU)")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-checks", action="store_true", help="decode figures only")
    parser.add_argument("--out", type=Path, default=Path("bench-results/gpu-check.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    setup = DecodeSetup(
        rows=args.rows,
        rank=args.rank,
        context=args.context or (256 if cuda else 32),
        iters=args.iters or (20 if cuda else 3),
        repeats=args.repeats,
    )
    report = run(device, args.size or ("8b" if cuda else "tiny"), setup, args.out, checks=not args.skip_checks)
    return 1 if any(c["status"] == "fail" for c in report["checks"]) else 0


if __name__ == "__main__":
    sys.exit(main())
