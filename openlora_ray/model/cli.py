"""``openlora-ray model ...``: prepare the demo base model."""

from __future__ import annotations

import argparse
from pathlib import Path

from openlora_ray.model.prepare import default_cache_root, prepare_demo_model


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("model", help="base model utilities").add_subparsers(dest="command", required=True)
    prep = group.add_parser("prepare", help="convert the demo model (SmolLM2-135M-Instruct) to safetensors, once")
    prep.add_argument("--cache-dir", type=Path, default=default_cache_root(), help="cache root (default: %(default)s)")
    prep.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    prep.set_defaults(func=_prepare)


def _prepare(args: argparse.Namespace) -> int:
    print(prepare_demo_model(args.cache_dir, force=args.force))
    return 0
