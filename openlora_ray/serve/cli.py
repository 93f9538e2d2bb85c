"""``openlora-ray serve``: a local Ray cluster serving the application, in the foreground.

This is what ``make run`` runs. It starts Ray on this machine, deploys the app from an
``AppConfig`` (the embedded local default, a YAML file, and/or flags), prints how to query it,
and shuts everything down on Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

import yaml

from openlora_ray.model.prepare import default_store_uri

log = logging.getLogger(__name__)

DEFAULT_STORE = default_store_uri()


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the OpenAI-compatible server on a local Ray cluster (foreground)")
    p.add_argument("--config", type=Path, help="YAML with AppConfig fields (defaults: a local CPU setup)")
    p.add_argument(
        "--store",
        help=f"adapter store URI: a folder or s3://bucket/prefix (default: {DEFAULT_STORE}; store-<name> beside it "
        "for another model of `model prepare`, where `demo adapters --model <name>` pushes)",
    )
    p.add_argument("--model", help="model folder, 'demo' (default) or gemma3-270m (prepared on first use)")
    p.add_argument("--replicas", type=int, help="model replicas (default 2)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    p.set_defaults(func=_serve)
    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="command", required=True)
    new = keys.add_parser("new", help="make a key: prints the key once and the line for the keys file")
    new.add_argument("--tenant", required=True, help="tenant the key belongs to (owner prefix of its adapters)")
    new.add_argument("--admin", action="store_true", help="may manage (push, prefetch, pin, evict) the tenant's adapters")
    new.add_argument("--name", help="a label for operators")
    new.set_defaults(func=_new_key)


def _new_key(args: argparse.Namespace) -> int:
    from openlora_ray.serve.auth import ApiKeyEntry, hash_key, new_key

    key = new_key()
    entry = ApiKeyEntry(tenant=args.tenant, sha256=hash_key(key), admin=args.admin, name=args.name)
    print(f"key (give it to the client; it is not stored anywhere): {key}")
    print("keys file entry:")
    print(yaml.safe_dump([entry.model_dump(exclude_none=True)], sort_keys=False), end="")
    return 0


def local_config(args: argparse.Namespace):
    """The embedded default for one machine, overridden by ``--config`` and then by flags."""
    from openlora_ray.model.prepare import MODELS
    from openlora_ray.serve.config import DEMO_MODEL, AppConfig

    data: dict = {
        "engine": {
            "num_slots": 8, "max_rank": 16, "max_running": 8, "max_seq_len": 1024, "memory_budget_bytes": 2 << 30, "torch_threads": 1,
        },
        # each model of `model prepare` has its own embedded store (demo adapters --model pushes there)
        "store": {"uri": default_store_uri(args.model) if args.model in MODELS else DEFAULT_STORE},
        "replicas": {"num_replicas": 2, "num_cpus": 0.5, "num_gpus": 0},
        # A loopback-only demo: no API keys. A config file for anything reachable must set auth.
        "auth": {"enabled": False},
    }
    if args.config:
        data.update(yaml.safe_load(args.config.read_text()) or {})
    if args.store:
        data["store"] = {**(data.get("store") or {}), "uri": args.store}
    if args.model:
        data["model"] = args.model
        # a model of `model prepare` answers to its own name, a folder to the folder's name
        # (`--model /models/Qwen2.5-7B-Instruct/` is "Qwen2.5-7B-Instruct")
        if args.model != DEMO_MODEL:
            name = args.model if args.model in MODELS else Path(args.model).expanduser().resolve().name
            data.setdefault("served_model_name", name)
    if args.replicas:
        data["replicas"] = {**data["replicas"], "num_replicas": args.replicas}
    return AppConfig.model_validate(data)


def _serve(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, loopback-only cluster
    import ray
    from ray import serve

    from openlora_ray.model.support import check_supported
    from openlora_ray.serve.app import build

    cfg = local_config(args)
    # prepare the demo model here, once, rather than in every replica; and refuse, before any
    # replica starts, a model the engine cannot serve (each replica would fail the same way)
    check_supported(cfg.model_path(), cfg.engine.max_seq_len)
    if cfg.store is not None and "://" not in cfg.store.uri:
        Path(cfg.store.uri).expanduser().mkdir(parents=True, exist_ok=True)
    ray.init(include_dashboard=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build(cfg), name="openlora", route_prefix="/")
        print(_usage(f"http://{args.host}:{args.port}", cfg.served_model_name), flush=True)
        stop.wait()
    finally:
        log.info("shutting down")
        serve.shutdown()
        ray.shutdown()
    return 0


def _usage(url: str, base: str) -> str:
    """How to query the server; the adapter in the examples is a demo adapter of the served model."""
    from openlora_ray.demo.models import DEMO_MODELS

    adapter = DEMO_MODELS[base].adapters[0] if base in DEMO_MODELS else "ADAPTER"
    return f"""
openlora-ray is serving on {url}  (Ctrl-C to stop)

  models:   curl {url}/v1/models
  base:     curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
              -d '{{"model": "{base}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'
  adapter:  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
              -d '{{"model": "{adapter}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}]}}'
  stream:   add "stream": true to either body

  Python:   from openai import OpenAI
            client = OpenAI(base_url="{url}/v1", api_key="unused")
            client.chat.completions.create(model="{adapter}", messages=[{{"role": "user", "content": "Why is the sky blue?"}}])
"""
