"""``openlora-ray adapters ...``: publish, list, inspect, fetch and delete adapters.

Adapters are named by a reference ``STORE_URI/NAME[@VERSION]``: the store root followed by the
adapter id, e.g. ``s3://my-bucket/adapters/sql-helper@v3`` or ``./adapters/sql-helper``. The S3
endpoint (MinIO), region and credentials come from the options below or the standard AWS
configuration (``AWS_ENDPOINT_URL_S3``, ``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID``...).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from openlora_ray.errors import OpenLoraError
from openlora_ray.store.listing import MAX_PAGE

_LARGE_FETCH = 8 << 20  # fetches smaller than this show no progress bar

DESCRIPTION = """\
Publish, list, inspect, fetch and delete LoRA adapters in a store. `init` records the base
model (and max rank) a store serves, so that `push` refuses adapters no replica could load.

An adapter is named by a reference STORE_URI/NAME[@VERSION]: the store root followed by the
adapter id, e.g. s3://my-bucket/adapters/sql-helper@v3 or ./adapters/sql-helper. A bare NAME
means its newest version. The S3 endpoint (MinIO), region and credentials come from the options
below or the standard AWS configuration (AWS_ENDPOINT_URL_S3, AWS_PROFILE, AWS_ACCESS_KEY_ID...).
"""

REF_HELP = "STORE_URI/NAME[@VERSION], e.g. s3://bucket/prefix/name@v1 or ./store/name"


class SettingsError(OpenLoraError):
    """Command-line options that do not make valid store settings."""


def register(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    opts = common.add_argument_group("store connection")
    opts.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO: http://host:9000); default: AWS config")
    opts.add_argument("--region", help="AWS region (default: AWS config)")
    opts.add_argument("--path-style", action="store_true", help="path-style addressing (MinIO, most self-hosted S3)")
    opts.add_argument("--profile", help="AWS profile from ~/.aws/config")
    opts.add_argument("--cache-dir", type=Path, help="local adapter cache (default: ~/.cache/openlora-ray/adapters)")
    opts.add_argument("--connect-timeout", type=float, default=3.0, help="seconds (default: %(default)s)")
    opts.add_argument("--read-timeout", type=float, default=20.0, help="seconds (default: %(default)s)")
    opts.add_argument("--retries", type=int, default=3, help="attempts per request (default: %(default)s)")

    group = sub.add_parser(
        "adapters", help="publish, list, inspect, fetch and delete LoRA adapters", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cmds = group.add_subparsers(dest="command", required=True)

    init = cmds.add_parser(
        "init", parents=[common], help="record the base model and max rank a store serves (checked at every push)",
        description="Record in STORE_URI/openlora-store.json which base model the store's adapters are for and "
        "the deployment's max_rank; every later push is checked against them.",
    )
    init.add_argument("store", help="STORE_URI, e.g. s3://bucket/prefix or ./store")
    init.add_argument("--base-model", type=Path, required=True, help="the served model's folder (its config.json)")
    init.add_argument("--max-rank", type=int, help="the deployment's engine.max_rank")
    init.add_argument("--name", help="the base model's name, for people (default: from config.json)")
    init.add_argument("--replace", action="store_true", help="change a profile already recorded")
    init.set_defaults(func=_init)

    push = cmds.add_parser("push", parents=[common], help="validate a PEFT adapter folder and upload it as a new version")
    push.add_argument("dir", type=Path, help="folder written by PEFT's save_pretrained")
    push.add_argument("ref", help=f"{REF_HELP}; without @VERSION the version is a UTC timestamp")
    push.add_argument("--base-model", type=Path,
                      help="check against this model folder too (must match the store's recorded base model, if any)")
    push.add_argument("--max-rank", type=int, help="refuse ranks above this (as well as the store's recorded max_rank)")
    push.set_defaults(func=_push)

    ls = cmds.add_parser("ls", parents=[common], help="list adapters and versions in a store")
    ls.add_argument("store", help="STORE_URI, e.g. s3://bucket/prefix or ./store")
    ls.add_argument("name", nargs="?", help="only this adapter's versions")
    ls.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    ls.add_argument("--limit", type=int, help=f"at most this many adapters (1-{MAX_PAGE}), then a hint to continue")
    ls.add_argument("--after", help="start after this adapter name (the hint a limited listing prints)")
    ls.set_defaults(func=_ls)

    inspect = cmds.add_parser("inspect", parents=[common], help="show a version's manifest and LoRA config")
    inspect.add_argument("ref", help=f"{REF_HELP}; a bare NAME means its newest version")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=_inspect)

    fetch = cmds.add_parser("fetch", parents=[common], help="download and validate a version into the local cache")
    fetch.add_argument("ref", help=REF_HELP)
    fetch.set_defaults(func=_fetch)

    rm = cmds.add_parser("rm", parents=[common], help="delete one version (NAME@VERSION required)")
    rm.add_argument("ref", help="STORE_URI/NAME@VERSION")
    rm.set_defaults(func=_rm)


def _store(args: argparse.Namespace, uri: str, **checks):
    from openlora_ray.store.settings import StoreSettings
    from openlora_ray.store.store import AdapterStore

    fields = dict(
        uri=uri,
        endpoint_url=args.endpoint_url,
        region=args.region,
        addressing_style="path" if args.path_style else "auto",
        profile=args.profile,
        connect_timeout_s=args.connect_timeout,
        read_timeout_s=args.read_timeout,
        max_attempts=args.retries,
    )
    if args.cache_dir is not None:
        fields["cache_dir"] = args.cache_dir
    try:
        return AdapterStore(StoreSettings(**fields), **checks)
    except ValidationError as e:
        first = e.errors()[0]
        raise SettingsError(f"{'.'.join(map(str, first['loc'])) or 'settings'}: {first['msg']}") from e


def _split(ref: str):
    from openlora_ray.store.uri import split_reference

    root, aid = split_reference(ref)
    return str(root), aid


@contextmanager
def _progress_bars(min_bytes: int = 0) -> Iterator:
    """A progress factory for the store that draws tqdm bars on stderr (only on a terminal)."""
    from tqdm import tqdm

    bars = []

    def factory(desc: str, total: int):
        if total < min_bytes:
            return None
        bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                   disable=None, leave=False)
        bars.append(bar)
        return bar.update

    try:
        yield factory
    finally:
        for bar in bars:
            bar.close()


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _init(args: argparse.Namespace) -> int:
    from openlora_ray.store.profile import StoreProfile

    profile = StoreProfile.from_model_dir(args.base_model, args.max_rank, args.name)
    _store(args, args.store).init(profile, replace=args.replace)
    print(f"{args.store} serves {profile.describe()}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from openlora_ray.store.profile import StoreProfile

    root, aid = _split(args.ref)
    dims = StoreProfile.from_model_dir(args.base_model, None).dims if args.base_model else None
    store = _store(args, root, dims=dims, max_rank=args.max_rank)
    with _progress_bars() as bars:
        manifest = store.push(args.dir, aid, progress=bars)
    print(f"pushed {manifest.name}@{manifest.version} ({_size(manifest.total_bytes)}) to {root}")
    return 0


def _ls(args: argparse.Namespace) -> int:
    store = _store(args, args.store)
    if args.limit is not None and not 1 <= args.limit <= MAX_PAGE:
        raise SettingsError(f"--limit must be between 1 and {MAX_PAGE}")
    more = None
    if args.name is not None:
        versions = store.list(args.name)
    elif args.limit is None:  # everything, streamed adapter by adapter
        versions = (v for a in store.adapters(args.after) for v in a.versions)
    else:
        page = store.page(args.after, args.limit)
        versions = [v for a in page.adapters for v in a.versions]
        more = page.last if page.has_more else None
    if args.json:
        for v in versions:
            print(json.dumps({"name": v.id.name, "version": v.id.version, "bytes": v.size,
                              "pushed_at": v.pushed_at.isoformat()}))
        if more:
            print(f"more adapters follow: continue with --after {more}", file=sys.stderr)
        return 0
    versions = list(versions)
    rows = [(v.id.name, v.id.version, _size(v.size), v.pushed_at.strftime("%Y-%m-%d %H:%M:%S")) for v in versions]
    headers = ("NAME", "VERSION", "SIZE", "PUSHED (UTC)")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if more:
        print(f"more adapters follow: continue with --after {more}", file=sys.stderr)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    root, aid = _split(args.ref)
    store = _store(args, root)
    pinned = store.pin(aid)
    manifest = store.stat(pinned)
    config = json.loads(store.read_config(pinned))
    keys = ("peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "base_model_name_or_path")
    summary = {k: config.get(k) for k in keys}
    if args.json:
        print(json.dumps({"id": str(pinned), "store": root, "manifest": json.loads(manifest.to_json()),
                          "config": summary}, indent=2))
        return 0
    print(f"id:          {pinned}")
    print(f"store:       {root}")
    print(f"created at:  {manifest.created_at.isoformat()}")
    print(f"size:        {_size(manifest.total_bytes)}")
    for fname, entry in manifest.files.items():
        print(f"file:        {fname}  {entry.size} bytes  sha256 {entry.sha256}")
    for k in keys:
        print(f"{k + ':':<13}{summary[k]}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    root, aid = _split(args.ref)
    with _progress_bars(min_bytes=_LARGE_FETCH) as bars:
        local = _store(args, root).fetch(aid, progress=bars)
    print(local.path)
    return 0


def _rm(args: argparse.Namespace) -> int:
    root, aid = _split(args.ref)
    _store(args, root).delete(aid)
    print(f"deleted {aid} from {root}")
    return 0
