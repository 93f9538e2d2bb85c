"""Fixtures of the store tests: a real S3-protocol server over HTTP, and real PEFT adapters.

The server is moto's ``ThreadedMotoServer`` on 127.0.0.1 and a free port; boto3 reaches it by
endpoint URL exactly as it would reach MinIO. The only addition is a WSGI wrapper that records
each request's method and path, which is how tests count downloads honestly, at the server.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
from pathlib import Path

import boto3
import pytest
from store_helpers import RecordingMotoServer, build_peft_adapter, make_bucket, settings_for

from openlora_ray.store import AdapterStore

@pytest.fixture(scope="session", autouse=True)
def aws_env(tmp_path_factory):
    """Dummy credentials, and nothing from the developer's own AWS config leaking in."""
    empty = tmp_path_factory.mktemp("aws") / "none"
    empty.write_text("")
    saved = dict(os.environ)
    for k in list(os.environ):
        if k.startswith("AWS_"):
            del os.environ[k]
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=str(empty),
        AWS_SHARED_CREDENTIALS_FILE=str(empty),
        AWS_EC2_METADATA_DISABLED="true",
    )
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def s3_server(aws_env):
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = RecordingMotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server):
    """The shared server with an empty request log and a fresh bucket for this test."""
    s3_server.log.clear()
    s3_server.bucket = make_bucket(s3_server.endpoint)
    return s3_server


@pytest.fixture
def s3_client(s3_server):
    return boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")


@pytest.fixture
def make_store(s3, tmp_path):
    """``make_store(**settings)``: an AdapterStore on this test's bucket with its own cache."""

    def make(cache_dir: Path | None = None, endpoint: str | None = None, **kw) -> AdapterStore:
        return AdapterStore(
            settings_for(
                f"s3://{s3.bucket}/adapters",
                cache_dir or tmp_path / "cache",
                endpoint or s3.endpoint,
                **kw,
            )
        )

    return make


# --- real PEFT adapters ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def adapters(tmp_path_factory) -> list[Path]:
    """Three distinct PEFT adapter folders (built once per session; copy before modifying)."""
    base = tmp_path_factory.mktemp("peft")
    return [build_peft_adapter(base / f"a{i}", seed=i) for i in range(3)]


@pytest.fixture
def adapter_copy(adapters, tmp_path):
    """A private copy of the first adapter that a test may break."""
    dst = tmp_path / "adapter"
    shutil.copytree(adapters[0], dst)
    return dst


# --- servers that misbehave --------------------------------------------------------------------
@pytest.fixture
def refused_endpoint() -> str:
    """An endpoint on which nothing listens: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def silent_endpoint():
    """An endpoint that accepts connections and never answers (a hung server)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                held.append(conn)
            except (TimeoutError, OSError):
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop.set()
    t.join()
    for c in held:
        c.close()
    srv.close()




@pytest.fixture
def half_body_endpoint(adapters):
    """A minimal S3-style HTTP server: serves ``half@v1`` but sends only half of the weights, then
    stalls (``?mode=stall``) or drops the connection; set ``server.mode`` before use."""
    import http.server

    from openlora_ray.store import MANIFEST_FILE
    from openlora_ray.store.manifest import build_manifest

    objects = {f: (adapters[0] / f).read_bytes() for f in ("adapter_config.json", "adapter_model.safetensors")}
    objects[MANIFEST_FILE] = build_manifest("half", "v1", adapters[0]).to_json()
    state = {"mode": "stall"}
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            body = objects.get(self.path.rsplit("/", 1)[-1].split("?")[0])
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not self.path.endswith("safetensors"):
                self.wfile.write(body)
                return
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            if state["mode"] == "stall":
                release.wait(10)
            self.close_connection = True

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", state
    release.set()
    srv.shutdown()
    srv.server_close()
