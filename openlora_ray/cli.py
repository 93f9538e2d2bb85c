"""The ``openlora-ray`` command line.

Each command group lives next to the code it drives and exposes ``register(subparsers)``; this
module only assembles them, so the CLI never imports torch or boto3 before a command needs them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from openlora_ray.errors import OpenLoraError

# Modules that each add one command group with ``register(subparsers)``.
COMMAND_GROUPS = (
    "openlora_ray.model.cli",
    "openlora_ray.bench.cli",
    "openlora_ray.demo.cli",
    "openlora_ray.serve.cli",
    "openlora_ray.store.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="openlora-ray", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="group", required=True)
    for name in COMMAND_GROUPS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except OpenLoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
