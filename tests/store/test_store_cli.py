"""``openlora-ray adapters push/ls/inspect/fetch/rm`` through ``openlora_ray.cli.main``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from store_helpers import WEIGHTS

from openlora_ray.cli import COMMAND_GROUPS, main


@pytest.fixture
def run(s3, tmp_path, capsys):
    """``run(*argv)`` -> (exit code, stdout, stderr), with this test's endpoint and cache."""

    def run(*argv: str) -> tuple[int, str, str]:
        opts = ["--endpoint-url", s3.endpoint, "--region", "us-east-1", "--path-style",
                "--cache-dir", str(tmp_path / "cache"), "--retries", "1", "--connect-timeout", "1"]
        rc = main(["adapters", *argv, *opts])
        out, err = capsys.readouterr()
        return rc, out, err

    return run


def test_store_commands_are_registered():
    assert "openlora_ray.store.cli" in COMMAND_GROUPS


def test_push_ls_inspect_fetch_rm(run, s3, adapters):
    uri = f"s3://{s3.bucket}/team"
    rc, out, _ = run("push", str(adapters[0]), f"{uri}/sql@v1")
    assert rc == 0 and out.startswith(f"pushed sql@v1 (") and out.rstrip().endswith(f"to {uri}")
    rc, out, _ = run("push", str(adapters[1]), f"{uri}/sql")
    assert rc == 0 and out.startswith("pushed sql@20")
    assert run("push", str(adapters[2]), f"{uri}/chat@a")[0] == 0

    rc, out, _ = run("ls", uri)
    lines = out.splitlines()
    assert rc == 0 and lines[0].split() == ["NAME", "VERSION", "SIZE", "PUSHED", "(UTC)"]
    rows = [line.split()[:2] for line in lines[1:]]
    assert rows[0] == ["chat", "a"] and ["sql", "v1"] in rows[1:] and len(rows) == 3
    rc, out, _ = run("ls", uri, "sql", "--json")
    assert rc == 0 and {json.loads(x)["version"] for x in out.splitlines()} >= {"v1"}

    rc, out, _ = run("inspect", f"{uri}/sql@v1")
    assert rc == 0 and "id:          sql@v1" in out and "r:           4" in out and WEIGHTS in out
    rc, out, _ = run("inspect", f"{uri}/sql", "--json")
    info = json.loads(out)
    assert rc == 0 and info["id"].startswith("sql@20") and info["config"]["lora_alpha"] == 8

    rc, out, _ = run("fetch", f"{uri}/chat")
    assert rc == 0 and (adapters[2] / WEIGHTS).read_bytes() == (Path(out.strip()) / WEIGHTS).read_bytes()

    rc, out, _ = run("rm", f"{uri}/sql@v1")
    assert rc == 0 and out.strip() == f"deleted sql@v1 from {uri}"
    rc, out, _ = run("ls", uri)
    assert "v1" not in out and len(out.splitlines()) == 3


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["inspect", "s3://{b}/team/missing@v1"], "adapter 'missing@v1' not found in s3://{b}/team"),
        (["push", "{bad}", "s3://{b}/team/x@v1"], "'x@v1' cannot be served: missing adapter_model.safetensors"),
        (["push", "{good}", "s3://{b}/team/.."], "invalid adapter id '..'"),
        (["push", "{good}", "s3://{b}/team/../x"], "prefix may not contain '.' or '..'"),
        (["rm", "s3://{b}/team/sql"], "without a version"),
        (["ls", "gs://{b}"], "unsupported scheme 'gs'"),
        (["ls", "s3://no-such-bucket-xyz"], "bucket 'no-such-bucket-xyz' does not exist"),
        (["fetch", "noslash"], "is not STORE_URI/NAME[@VERSION]"),
    ],
)
def test_failures_exit_nonzero_with_one_line(run, s3, adapters, tmp_path, argv, reason):
    fmt = dict(b=s3.bucket, bad=str(tmp_path), good=str(adapters[0]))
    rc, out, err = run(*[a.format(**fmt) for a in argv])
    assert rc == 1 and out == ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("error: ")
    assert reason.format(**fmt) in lines[0]


def test_push_existing_version_fails(run, s3, adapters):
    uri = f"s3://{s3.bucket}/p"
    assert run("push", str(adapters[0]), f"{uri}/x@v1")[0] == 0
    rc, _, err = run("push", str(adapters[1]), f"{uri}/x@v1")
    assert rc == 1 and "already exists" in err and "immutable" in err


def test_server_down_is_one_line(capsys, refused_endpoint):
    rc = main(["adapters", "ls", "s3://some-bucket/x", "--endpoint-url", refused_endpoint, "--retries", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err and refused_endpoint in err


def test_local_store_via_cli(tmp_path, adapters, capsys):
    store = tmp_path / "store"
    store.mkdir()
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert main(["adapters", "push", str(adapters[0]), f"{store}/loc@v1", *cache]) == 0
    assert main(["adapters", "ls", f"file://{store}", *cache]) == 0
    assert ["loc", "v1"] in [line.split()[:2] for line in capsys.readouterr().out.splitlines()]
