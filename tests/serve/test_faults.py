"""Faults the service must survive, on a real local Ray cluster with a real S3 server over HTTP.

Issue 7, "Faults that must be survived": the object store going down or hanging while requests
arrive, corrupted and malicious adapters, a replica process killed mid-stream, clients that hang
up mid-stream, and a burst that exhausts KV-cache rows and LoRA slots. Nothing is patched in
process: the store is moto's S3 server on a fixed loopback port (stopped, replaced by a socket
that accepts and never answers, and restarted on the same port), bad adapters are written into
the bucket with plain ``put_object`` calls that bypass the store's push validation, replicas are
killed with ``ray.kill`` on their Serve actor, and disconnects are real socket closes.

One application (2 replicas of a tiny random Llama with SmolLM2's tokenizer, 2 slots and 4 KV rows
each) serves the tests, which run in file order and each leave it healthy; the burst goes to a
second, deliberately small application (one replica, 2 rows, 1 slot) so that it can be exhausted.
"""

from __future__ import annotations

import json
import logging
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests

from peft_helpers import save_peft_adapter
from serve_helpers import free_port, wait_for

log = logging.getLogger(__name__)

APP = "faults"
BASE = "tiny"
BUCKET = "openlora-faults"
PREFIX = "adapters"
REPLICAS = 2
MAX_RUNNING = 4  # KV-cache rows per replica
NUM_SLOTS = 2
MAX_RANK = 8
# Store client settings: what "within the configured timeout" is measured against.
CONNECT_TIMEOUT_S = 1.0
READ_TIMEOUT_S = 1.0
MAX_ATTEMPTS = 2
# botocore's standard retry mode sleeps up to 1 s between the two attempts.
STORE_DEADLINE_S = MAX_ATTEMPTS * (CONNECT_TIMEOUT_S + READ_TIMEOUT_S) + 1.0
GOOD = ("a0", "a1", "a2", "a3")  # more adapters than one replica has slots
PROMPTS = ("The weather today", "Tell me a story about", "List three colours:")
LONG_PROMPT = "Write a very long essay about rivers"
LONG_TOKENS = 4000  # a stream that runs for many seconds (at least 4000 decode steps)


class FlakyS3:
    """moto's S3 server on one fixed loopback port, which tests can take down, hang and restore.

    moto keeps buckets in this process's memory, so a server restarted on the same port serves
    the same objects: from a client's point of view the store went away and came back.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self._server: Any = None
        self._silent: socket.socket | None = None
        self._held: list[socket.socket] = []
        self._stop = threading.Event()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def down(self) -> None:
        """Stop the server: connections are refused."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    def hang(self) -> None:
        """Down, then a listener on the same port that accepts connections and never answers."""
        self.down()
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        srv.settimeout(0.1)
        self._silent, self._stop = srv, threading.Event()

        def accept() -> None:
            while not self._stop.is_set():
                try:
                    self._held.append(srv.accept()[0])
                except OSError:
                    continue

        threading.Thread(target=accept, daemon=True, name="silent-s3").start()

    def restore(self) -> None:
        """Close the silent listener (if any) and start the real server again on the same port."""
        if self._silent is not None:
            self._stop.set()
            time.sleep(0.2)
            for conn in self._held:
                conn.close()
            self._held.clear()
            self._silent.close()
            self._silent = None
        if self._server is None:
            self.up()


@dataclass(frozen=True)
class FaultsApp:
    url: str
    s3: FlakyS3
    node_cache: Path  # the replicas' disk cache (one node, so shared by both)
    model_dir: Path
    marker: Path  # created only if someone unpickles the malicious adapter


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def s3() -> Iterator[FlakyS3]:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = FlakyS3()
    server.up()
    boto3.client("s3", **_client_kwargs(server.endpoint)).create_bucket(Bucket=BUCKET)
    yield server
    server.restore()
    server.down()


def _client_kwargs(endpoint: str) -> dict[str, Any]:
    return dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")


def _store_settings(endpoint: str, cache_dir: Path) -> dict[str, Any]:
    return dict(
        uri=f"s3://{BUCKET}/{PREFIX}",
        endpoint_url=endpoint,
        region="us-east-1",
        addressing_style="path",
        access_key_id="testing",
        secret_access_key="testing",
        connect_timeout_s=CONNECT_TIMEOUT_S,
        read_timeout_s=READ_TIMEOUT_S,
        max_attempts=MAX_ATTEMPTS,
        latest_ttl_s=0.0,  # every bare name asks the store: the outage is seen at once
        cache_dir=str(cache_dir),
    )


@pytest.fixture(scope="module")
def app(serve_url: str, s3: FlakyS3, tiny_chat_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FaultsApp:
    from ray import serve

    from openlora_ray.serve.app import build
    from openlora_ray.store.settings import StoreSettings
    from openlora_ray.store.store import AdapterStore

    work = tmp_path_factory.mktemp("fault-adapters")
    store = AdapterStore(StoreSettings(**_store_settings(s3.endpoint, work / "push-cache")))
    for i, name in enumerate((*GOOD, "warm", "cold")):
        src = save_peft_adapter(tiny_chat_model_dir, work / name, 4, 8.0, ("q_proj", "v_proj", "down_proj"), seed=100 + i)
        store.push(src, f"{name}@v1")
    marker = work / "unpickled"
    _publish_bad_adapters(s3, store, tiny_chat_model_dir, work, marker)

    node_cache = tmp_path_factory.mktemp("node-cache")
    cfg = _app_config(model_dir=tiny_chat_model_dir, store=_store_settings(s3.endpoint, node_cache),
                      engine={"num_slots": NUM_SLOTS, "max_running": MAX_RUNNING},
                      replicas={"num_replicas": REPLICAS, "max_ongoing_requests": 8, "max_queued_requests": 8})
    serve.run(build(cfg), name=APP, route_prefix="/")
    return FaultsApp(serve_url, s3, node_cache, tiny_chat_model_dir, marker)


def _app_config(model_dir: Path, store: dict[str, Any], engine: dict[str, Any], replicas: dict[str, Any]) -> Any:
    from openlora_ray.serve.config import AppConfig

    return AppConfig(
        model=str(model_dir),
        served_model_name=BASE,
        engine={"max_rank": MAX_RANK, "max_seq_len": 4096, "torch_threads": 1, "memory_budget_bytes": 1 << 30, **engine},
        store=store,
        replicas={"num_cpus": 0, "num_gpus": 0, "stats_period_s": 0.5, "health_check_period_s": 1, "graceful_shutdown_timeout_s": 1, **replicas},
        ingress_num_cpus=0,
        auth={"enabled": False},
        limits={"requests_per_s": 1000, "burst": 1000, "max_streams": 1000},
    )


@pytest.fixture(scope="module")
def burst_app(app: FaultsApp) -> str:
    """One small replica, easy to exhaust: 2 KV rows, 1 slot, no engine queue, Serve limits just above.

    Serve may hand the replica 3 requests (``max_ongoing_requests``) while its engine takes 2
    (rows + queue): the third is the engine's 429. One more waits in the router's queue
    (``max_queued_requests``); beyond that Serve refuses with 503.
    """
    from ray import serve

    from openlora_ray.serve.app import build

    cfg = _app_config(model_dir=app.model_dir,
                      store=_store_settings(app.s3.endpoint, app.node_cache),
                      engine={"num_slots": 1, "max_running": 2, "max_queue": 0},
                      replicas={"num_replicas": 1, "max_ongoing_requests": 3, "max_queued_requests": 1})
    serve.run(build(cfg), name="burst", route_prefix="/burst")
    return app.url + "/burst"


@pytest.fixture(scope="module")
def solo(app: FaultsApp) -> dict[tuple[str, str], str]:
    """Greedy answers of each (model, prompt), every request sent alone on an idle service."""
    out = {}
    for model in (BASE, *GOOD, "warm"):
        for prompt in PROMPTS:
            r = complete(app.url, model, prompt)
            assert r.status_code == 200, r.text
            out[(model, prompt)] = r.json()["choices"][0]["text"]
    return out


# -------------------------------------------------------------------------------------- helpers
def complete(url: str, model: str, prompt: str, max_tokens: int = 12, timeout: float = 60, **extra: Any) -> requests.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return requests.post(f"{url}/v1/completions", json=body, timeout=timeout)


def sse_payloads(response: requests.Response) -> Iterator[Any]:
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


def stream_text(url: str, model: str, prompt: str, max_tokens: int = 12) -> tuple[int, str, list[Any]]:
    """Status, concatenated text and all SSE payloads of one streamed greedy completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=60) as r:
        if r.status_code != 200:
            return r.status_code, "", [json_or_text(r)]
        events = list(sse_payloads(r))
    text = "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e.get("choices"))
    return 200, text, events


def open_stream(url: str, body: dict[str, Any]) -> socket.socket:
    """A streamed completion on a bare socket, read until its first SSE event (a client to hang up)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    data = json.dumps(body).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    received = b""
    while b"\r\n\r\ndata: " not in received and b"\ndata: " not in received:
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    return sock


def json_or_text(r: requests.Response) -> dict[str, Any]:
    """The JSON error body, or the raw text of a response that is not JSON (a crash's plain 500)."""
    try:
        return r.json()
    except ValueError:
        return {"raw": r.text}


def describe(app_name: str = APP) -> list[dict[str, Any]]:
    """Every live replica's management view (routing state, pins, counters), straight from Serve."""
    from ray import serve

    return serve.get_deployment_handle("LoraReplica", app_name).broadcast("describe").results()


def error_of(r: requests.Response) -> dict[str, Any]:
    err = r.json()["error"]
    assert err["message"] and "Traceback" not in err["message"]
    return err


def idle(states: list[dict[str, Any]]) -> bool:
    return all(s["running"] == 0 and s["queued"] == 0 for s in states)


# ------------------------------------------------------------------------ bad adapters (raw puts)
def _publish_raw(s3: FlakyS3, name: str, files: dict[str, bytes], manifest: bytes | None = None) -> None:
    """Write a version into the bucket as a careless or malicious publisher would: no validation."""
    import hashlib
    from datetime import datetime, timezone

    from openlora_ray.store.manifest import MANIFEST_FILE

    client = boto3.client("s3", **_client_kwargs(s3.endpoint))
    for fname, data in files.items():
        client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{name}/v1/{fname}", Body=data)
    if manifest is None:  # a manifest that agrees with the bad files, as the store would write it
        entries = {f: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for f, d in files.items()}
        manifest = json.dumps({"format": 1, "name": name, "version": "v1", "created_at": datetime.now(timezone.utc).isoformat(), "files": entries}).encode()
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{name}/v1/{MANIFEST_FILE}", Body=manifest)


class _Payload:
    """Unpickling this creates the marker file: proof that nobody ever unpickles adapter weights."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _publish_bad_adapters(s3: FlakyS3, store: Any, model_dir: Path, work: Path, marker: Path) -> None:
    import numpy as np
    from safetensors.numpy import load_file, save_file

    from openlora_ray.adapter_format import CONFIG_FILE, WEIGHTS_FILE

    good = save_peft_adapter(model_dir, work / "good-src", 4, 8.0, ("q_proj", "v_proj"), seed=7)
    config = (good / CONFIG_FILE).read_bytes()
    tensors = load_file(good / WEIGHTS_FILE)
    weights = (good / WEIGHTS_FILE).read_bytes()

    def saved(t: dict[str, np.ndarray]) -> bytes:
        path = work / "tmp.safetensors"
        save_file(t, path, metadata={"format": "pt"})
        return path.read_bytes()

    # A header length of 1 TB: a reader that trusts it would try to allocate it.
    _publish_raw(s3, "bad-header", {CONFIG_FILE: config, WEIGHTS_FILE: (1 << 40).to_bytes(8, "little") + weights[8:]})
    key = next(k for k in tensors if "lora_A" in k)
    _publish_raw(s3, "bad-shapes", {CONFIG_FILE: config, WEIGHTS_FILE: saved({**tensors, key: np.ascontiguousarray(tensors[key][:, :32])})})
    key = next(k for k in tensors if "lora_B" in k)
    poisoned = tensors[key].copy()
    poisoned[3, 1] = np.nan
    _publish_raw(s3, "bad-nan", {CONFIG_FILE: config, WEIGHTS_FILE: saved({**tensors, key: poisoned})})
    big = save_peft_adapter(model_dir, work / "huge-rank", 256, 16.0, ("q_proj", "v_proj"), seed=8)
    _publish_raw(s3, "bad-rank", {f: (big / f).read_bytes() for f in (CONFIG_FILE, WEIGHTS_FILE)})
    bomb = pickle.dumps(_Payload(marker))
    # Pickle-only, as older PEFT saves it: the manifest names adapter_model.bin.
    _publish_raw(s3, "bad-pickle", {CONFIG_FILE: config, "adapter_model.bin": bomb})
    # A pickle renamed to .safetensors, with a manifest that vouches for it.
    _publish_raw(s3, "bad-pickle-renamed", {CONFIG_FILE: config, WEIGHTS_FILE: bomb})
    # Pushed properly, then the weights object is replaced by one of the same size, one bit off.
    store.push(good, "bad-sha@v1")
    flipped = bytearray(weights)
    flipped[-3] ^= 0x10
    boto3.client("s3", **_client_kwargs(s3.endpoint)).put_object(Bucket=BUCKET, Key=f"{PREFIX}/bad-sha/v1/{WEIGHTS_FILE}", Body=bytes(flipped))


BAD = {
    "bad-header": "not a valid safetensors file",
    "bad-shapes": "has shape [4, 32], expected [4, 64]",
    "bad-nan": "NaN/Inf",
    "bad-rank": f"rank 256 exceeds the server's max_rank {MAX_RANK}",
    "bad-pickle": "unexpected files ['adapter_model.bin']",
    "bad-pickle-renamed": "not a valid safetensors file",
    "bad-sha": "sha256 mismatch for adapter_model.safetensors",
}


# ---------------------------------------------------------------------------------------- tests
@pytest.mark.timeout(300)  # includes the cluster, the app and the adapters (module fixtures)
def test_bad_adapters_are_400_load_nothing_and_do_not_disturb_others(app: FaultsApp, solo):
    """Adapters that reach the store without push validation are refused where they are fetched.

    Each is a 400 (code invalid_adapter) naming the adapter and the reason, by bare name and pinned
    id, twice (nothing was half-loaded the first time); no replica holds it in a slot, host RAM or
    the disk cache, no temp folder is left, the pickles are never unpickled, and good requests
    running meanwhile on both replicas all get exactly their solo answers.
    """
    stop = threading.Event()
    others: list[tuple[str, str, int, str]] = []

    def traffic() -> None:  # good requests all along, on both replicas
        i = 0
        while not stop.is_set():
            model, prompt = (BASE, *GOOD)[i % 5], PROMPTS[i % 3]
            r = complete(app.url, model, prompt)
            others.append((model, prompt, r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text))
            i += 1

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        for _ in range(2):  # a second try is refused the same way: nothing was half-loaded
            for name, reason in BAD.items():
                for model in (name, f"{name}@v1"):
                    r = complete(app.url, model, "hello")
                    assert r.status_code == 400, (model, r.text)
                    err = error_of(r)
                    assert err["code"] == "invalid_adapter" and reason in err["message"] and name in err["message"], (model, err)
        status, _, events = stream_text(app.url, "bad-nan", "hello")
        assert status == 400 and events[0]["error"]["code"] == "invalid_adapter"  # refused before the stream starts
    finally:
        stop.set()
        thread.join()

    assert len(others) >= 10
    assert [o for o in others if o[2] != 200 or o[3] != solo[(o[0], o[1])]] == []
    for state in describe():
        held = {*state["resident"], *state["host"], *state["loading"], *state["disk"]}
        assert not {a for a in held if a.startswith("bad-")}, state
    cached = [p for p in app.node_cache.rglob("*") if "bad-" in p.as_posix()]
    assert cached == [] and list((app.node_cache / ".tmp").iterdir()) == []
    assert not app.marker.exists()  # the pickles were never unpickled


@pytest.mark.timeout(120)
def test_store_down_or_hanging_cached_adapters_keep_serving_and_service_recovers(app: FaultsApp, solo):
    """The store refusing connections, then accepting and never answering, then coming back.

    During both outages: an uncached adapter (pinned id or bare name, plain or streamed) is a 503
    ``store_unavailable`` (the endpoint is logged, never shown), with Retry-After, within the client's configured
    timeouts; adapters in a slot or only in the node's disk cache, by pinned id or bare name, and
    the base model keep answering exactly as before. Afterwards the same deployment fetches the
    uncached adapter by itself.
    """
    # "warm" is fetched once, then dropped from slots and host RAM: it lives on the node's disk only.
    assert complete(app.url, "warm", PROMPTS[0]).status_code == 200
    assert requests.post(f"{app.url}/v1/adapters/warm@v1/evict", json={}, timeout=30).status_code == 200
    wait_for(lambda: all("warm@v1" in s["disk"] and "warm@v1" not in {*s["resident"], *s["host"]} for s in describe()), timeout=15)
    hot = GOOD[0]
    assert complete(app.url, hot, PROMPTS[0]).status_code == 200
    assert any(f"{hot}@v1" in s["resident"] for s in describe())  # in a slot
    try:
        for outage in ("down", "hang"):
            getattr(app.s3, outage)()
            # Uncached: a clear 503 naming the store, within the configured client timeouts.
            for model in ("cold@v1", "cold"):
                start = time.monotonic()
                r = complete(app.url, model, PROMPTS[0])
                elapsed = time.monotonic() - start
                assert r.status_code == 503, (outage, model, r.text)
                err = error_of(r)
                assert err["code"] == "store_unavailable" and app.s3.endpoint not in err["message"], err
                assert int(r.headers["Retry-After"]) >= 1
                assert elapsed < STORE_DEADLINE_S + 2.0, (outage, model, elapsed)
            # Cached (disk tier and slot), by pinned id and by bare name, and the base model.
            for model in ("warm@v1", "warm", f"{hot}@v1", hot, BASE):
                r = complete(app.url, model, PROMPTS[1])
                assert r.status_code == 200, (outage, model, r.text)
                assert r.json()["choices"][0]["text"] == solo[(model.split("@")[0], PROMPTS[1])]
            status, _, events = stream_text(app.url, "cold@v1", PROMPTS[0])
            assert status == 503 and events[0]["error"]["code"] == "store_unavailable"
    finally:
        app.s3.restore()
    # Back by itself: the same replicas and ingress, nothing restarted or reconfigured.
    wait_for(lambda: complete(app.url, "cold@v1", PROMPTS[0]).status_code == 200, timeout=15, interval=0.5)
    r = complete(app.url, "cold", PROMPTS[2])
    assert r.status_code == 200 and r.json()["model"] == "cold"
    wait_for(lambda: any("cold@v1" in s["disk"] for s in describe()), timeout=15)  # disk listing is refreshed every 5 s


@pytest.mark.timeout(120)
def test_client_disconnect_cancels_the_request_and_frees_its_row_and_slot(app: FaultsApp, solo):
    """Clients hanging up mid-stream cancel their requests in the engines.

    Every KV row of the deployment is taken by a long stream; once the sockets close, the engines
    report nothing running or queued within seconds (the streams would run far longer), the
    adapter's slot pins are gone (evicting it is allowed, not a 409), and a full deployment's worth
    of new requests runs at once with correct answers (no row leaked).
    """
    body = {"model": "a1", "prompt": LONG_PROMPT, "max_tokens": LONG_TOKENS, "temperature": 0, "stream": True}
    # As many streams as the deployment has KV rows; each has produced tokens when opened, so it
    # holds a row and a pin on a1's slot.
    socks = [open_stream(app.url, body) for _ in range(REPLICAS * MAX_RUNNING)]
    busy = describe()
    assert sum(s["running"] for s in busy) >= REPLICAS  # decoding on the replicas right now
    started = time.monotonic()
    for sock in socks:  # hang up
        sock.close()
    wait_for(lambda: idle(describe()), timeout=10, interval=0.1)
    cancelled_in = time.monotonic() - started
    log.info("all %d streams cancelled in the engines %.2f s after the clients hung up", len(socks), cancelled_in)
    # Far sooner than 4000 decode steps would take; the slot pins are gone too, or evict would be 409.
    assert cancelled_in < 5.0, cancelled_in
    r = requests.post(f"{app.url}/v1/adapters/a1@v1/evict", json={}, timeout=30)
    assert r.status_code == 200, r.text
    # Every KV row is free again: a full deployment's worth of requests runs at once, promptly.
    with ThreadPoolExecutor(REPLICAS * MAX_RUNNING) as pool:
        done = list(pool.map(lambda i: complete(app.url, GOOD[i % 4], PROMPTS[0], timeout=30), range(REPLICAS * MAX_RUNNING)))
    wrong = [(r.status_code, r.text) for r in done if r.status_code != 200 or r.json()["choices"][0]["text"] != solo[(r.json()["model"], PROMPTS[0])]]
    assert not wrong, wrong


@pytest.mark.timeout(180)  # includes deploying the small application
def test_burst_queues_then_refuses_with_429_or_503_and_never_corrupts_a_stream(burst_app: str):
    """A burst far beyond the rows, slots and queues of a small replica.

    Only 200, 429 or 503 come back; refusals are OpenAI-shaped ``overloaded`` errors with
    Retry-After; some requests wait and are then served; every answer, streamed or not, is the text
    the same greedy request gets alone; streams end with [DONE] and no error event; afterwards the
    same replica process is idle and answers correctly.
    """
    from ray import serve

    models = (BASE, *GOOD)  # five models for one slot: requests also wait for the slot
    alone = {}
    for model in models:
        for prompt in PROMPTS:
            r = complete(burst_app, model, prompt, max_tokens=32)
            assert r.status_code == 200, r.text
            alone[(model, prompt)] = r.json()["choices"][0]["text"]
    [before] = describe("burst")

    def run(i: int) -> tuple[str, str, bool, int, str, dict[str, Any]]:
        model, prompt, stream = models[i % 5], PROMPTS[i % 3], i % 2 == 0
        if stream:
            status, text, events = stream_text(burst_app, model, prompt, max_tokens=32)
            if status != 200:
                return model, prompt, stream, status, "", events[0]
            broken = events[-1] != "[DONE]" or any("error" in e for e in events if isinstance(e, dict))
            return model, prompt, stream, -1 if broken else 200, text, {}
        r = complete(burst_app, model, prompt, max_tokens=32)
        if r.status_code != 200:
            return model, prompt, stream, r.status_code, "", {"retry_after": r.headers.get("Retry-After"), **json_or_text(r)}
        return model, prompt, stream, 200, r.json()["choices"][0]["text"], {}

    with ThreadPoolExecutor(48) as pool:
        results = list(pool.map(run, range(96)))
    statuses = [r[3] for r in results]
    assert set(statuses) <= {200, 429, 503}, statuses  # -1 would be a broken stream, 500 a crash
    served = [r for r in results if r[3] == 200]
    refused = [r for r in results if r[3] != 200]
    assert len(served) > 2  # more than the replica's rows: requests kept being admitted as rows freed
    assert refused, "the burst did not exhaust the replica"
    wrong = [(m, p, st) for m, p, st, _, text, _ in served if text != alone[(m, p)]]
    assert wrong == []  # every answer is the one the request gets alone: no crosstalk between rows
    for *_, err in refused:
        assert err["error"]["code"] == "overloaded" and err["error"]["message"], err
        assert err.get("retry_after") is None or int(err["retry_after"]) >= 1
    log.info("burst: %d served, %s refused", len(served), {c: statuses.count(c) for c in (429, 503)})
    # Never a crash: the same replica process, idle again, and still answering correctly.
    wait_for(lambda: idle(describe("burst")), timeout=15)
    [after] = describe("burst")
    assert after["replica_id"] == before["replica_id"]
    assert serve.status().applications["burst"].status == "RUNNING"
    assert complete(burst_app, "a2", PROMPTS[0], max_tokens=32).json()["choices"][0]["text"] == alone[("a2", PROMPTS[0])]


@pytest.mark.timeout(180)
def test_replica_killed_mid_stream(app: FaultsApp, solo):
    """``ray.kill`` of the replica serving a stream.

    The stream ends promptly with one ``replica_unavailable`` error event and [DONE] (no hang, no
    fake finish); new requests go to the survivor with correct answers; Serve starts a new replica,
    whose state shows in ``GET /v1/adapters`` and which the router then prefers for an adapter
    only it holds in a slot.
    """
    import ray
    from ray import serve

    body = {"model": "a3", "prompt": LONG_PROMPT, "max_tokens": LONG_TOKENS, "temperature": 0, "stream": True}
    before = {s["replica_id"] for s in describe()}
    victim_stream = requests.post(f"{app.url}/v1/completions", json=body, stream=True, timeout=30)
    victim = victim_stream.headers["x-openlora-replica"]
    events = sse_payloads(victim_stream)
    assert next(events)["choices"][0]["finish_reason"] is None  # it is streaming
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#LoraReplica#{victim}", namespace="serve"), no_restart=True)
    killed_at = time.monotonic()
    rest = list(events)  # a hang would trip the 30 s read timeout
    assert rest[-1] == "[DONE]"
    errors = [e["error"] for e in rest[:-1] if "error" in e]
    assert len(errors) == 1 and errors[0]["code"] == "replica_unavailable", rest[-3:]
    assert not any(e["choices"][0]["finish_reason"] for e in rest[:-1] if "choices" in e)  # no fake ending
    log.info("the killed replica's stream ended with an error event %.2f s after the kill", time.monotonic() - killed_at)
    assert time.monotonic() - killed_at < 10

    # New requests go to the survivor, and get the same answers as before.
    survivor = (before - {victim}).pop()
    for model in (BASE, "a3", "a0"):
        r = complete(app.url, model, PROMPTS[0])
        assert r.status_code == 200, r.text
        assert r.headers["x-openlora-replica"] == survivor
        assert r.json()["choices"][0]["text"] == solo[(model, PROMPTS[0])]

    # Serve replaces the replica; the new one reports its state and the router uses it.
    def replaced() -> str | None:
        status = serve.status().applications[APP].deployments["LoraReplica"]
        if status.replica_states.get("RUNNING") != REPLICAS:
            return None
        try:
            ids = {s["replica_id"] for s in describe()}
        except Exception:  # noqa: BLE001 - the handle may still list the dead replica for a moment
            return None
        new = ids - before
        return new.pop() if len(ids) == REPLICAS and new else None

    new = wait_for(replaced, timeout=90, interval=0.5)
    # a2 in a slot of the new replica only (the survivor may hold it from earlier tests).
    wait_for(lambda: requests.post(f"{app.url}/v1/adapters/a2@v1/evict", json={}, timeout=30).status_code in (200, 404), timeout=15)
    handle = serve.get_deployment_handle("LoraReplica", APP)
    assert handle.broadcast("prefetch", "a2@v1", [new], False).results().count(new) == 1

    def listed() -> bool:
        r = requests.get(f"{app.url}/v1/adapters", timeout=30)
        if r.status_code != 200:  # 503 while the ingress's handle still lists the dead replica
            return False
        entry = next(a for a in r.json()["data"] if a["id"] == "a2@v1")
        return entry["resident_on"] == [new]

    wait_for(listed, timeout=15)
    # The routers learn a replica's state from the controller's poll (stats_period_s = 0.5 s).
    time.sleep(2.0)
    homes = {complete(app.url, "a2@v1", PROMPTS[i % 3]).headers["x-openlora-replica"] for i in range(4)}
    assert homes == {new}
