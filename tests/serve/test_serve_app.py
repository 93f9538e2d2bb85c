"""The whole application on a real local Ray cluster: HTTP through the Serve proxy."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from serve_helpers import metrics_port, uneven_memory_replica, wait_for

pytestmark = pytest.mark.timeout(240)

BASE = "tiny"


@pytest.fixture(scope="module")
def app(serve_url: str, tiny_chat_model_dir: Path, chat_store: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    from ray import serve

    from openlora_ray.engine.config import EngineSettings
    from openlora_ray.serve.app import build
    from openlora_ray.serve.config import AppConfig, ReplicaSettings
    from openlora_ray.store.settings import StoreSettings

    cfg = AppConfig(
        model=str(tiny_chat_model_dir),
        served_model_name=BASE,
        engine=EngineSettings(num_slots=2, max_rank=8, max_running=4, max_seq_len=160, torch_threads=1),
        store=StoreSettings(uri=str(chat_store), cache_dir=tmp_path_factory.mktemp("node-cache")),
        replicas=ReplicaSettings(num_replicas=2, num_cpus=0, num_gpus=1, max_ongoing_requests=4, max_queued_requests=6, stats_period_s=0.5, health_check_period_s=2, graceful_shutdown_timeout_s=1),
        ingress_num_cpus=0,
        auth={"enabled": False},
    )
    # One replica with a KV cache three times the other's (10 blocks hold one 160-token sequence).
    replica_class = uneven_memory_replica(tmp_path_factory.mktemp("replica-claims"), [40, 120])
    serve.run(build(cfg, replica_class=replica_class), name="openlora", route_prefix="/")
    return serve_url


def post(url: str, path: str, body: dict, **kw) -> requests.Response:
    return requests.post(url + path, json=body, timeout=60, **kw)


def residency(url: str, adapter: str) -> dict:
    data = requests.get(f"{url}/v1/adapters", timeout=30).json()["data"]
    return next(a for a in data if a["id"] == adapter)


def empty_every_slot(url: str) -> None:
    """Evict every resident adapter, so that the next cold placement is decided by free KV room
    (the router first prefers a replica whose load evicts nothing, or the coldest adapter)."""
    for replica in requests.get(f"{url}/v1/replicas", timeout=30).json()["data"]:
        for adapter in replica["resident"]:
            assert post(url, f"/v1/adapters/{adapter}/evict", {}).status_code == 200
    wait_for(lambda: all(not r["resident"] for r in requests.get(f"{url}/v1/replicas", timeout=30).json()["data"]))
    time.sleep(2.0)  # the routers see replica stats a period or two (0.5 s each here) later


def sse_events(response: requests.Response) -> list:
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def test_prometheus_metrics_are_exported(app):
    post(app, "/v1/completions", {"model": "gamma", "prompt": "metrics", "max_tokens": 3})

    def scrape() -> str:
        text = requests.get(f"http://127.0.0.1:{metrics_port()}/metrics", timeout=10).text
        return text if "ray_openlora_requests_total" in text and "ray_openlora_adapter_loads_total" in text else ""

    text = wait_for(scrape, timeout=90, interval=2)
    assert 'model="gamma"' in text and "ray_openlora_time_to_first_token_seconds_bucket" in text
    assert "ray_openlora_slots_used" in text and "ray_openlora_engine_queue_depth" in text


def test_completions_and_chat_with_and_without_adapters(app):
    r = post(app, "/v1/completions", {"model": BASE, "prompt": "Hello there", "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] in ("length", "stop")
    assert 1 <= body["usage"]["completion_tokens"] <= 6 and body["usage"]["prompt_tokens"] > 0
    chat = {"model": "alpha", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8, "temperature": 0}
    r = post(app, "/v1/chat/completions", chat)
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    base = post(app, "/v1/chat/completions", dict(chat, model=BASE)).json()["choices"][0]["message"]["content"]
    assert base != msg["content"]  # the adapter changes the answer


def test_streaming_sse_matches_the_plain_answer(app):
    chat = {"model": "beta", "messages": [{"role": "user", "content": "Count to three"}], "max_tokens": 10, "temperature": 0}
    plain = post(app, "/v1/chat/completions", chat).json()
    with requests.post(app + "/v1/chat/completions", json=dict(chat, stream=True, stream_options={"include_usage": True}), stream=True, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    with requests.post(app + "/v1/completions", json={"model": "beta", "prompt": "abc", "max_tokens": 4, "stream": True}, stream=True, timeout=60) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]" and all(e["object"] == "text_completion" for e in events[:-1])


def test_official_openai_client_streams(app):
    from openai import OpenAI

    client = OpenAI(base_url=app + "/v1", api_key="unused")
    stream = client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    plain = client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0)
    assert "".join(pieces) == plain.choices[0].message.content
    assert {m.id for m in client.models.list()} >= {BASE, "alpha", "beta", "gamma"}


def test_errors_have_openai_bodies_and_the_service_keeps_serving(app):
    cases = [
        ({"model": "no-such-adapter", "prompt": "x"}, 404, "model_not_found"),
        ({"model": "../etc", "prompt": "x"}, 400, "invalid_model_id"),
        ({"model": "toolarge", "prompt": "x", "max_tokens": 2}, 400, "invalid_adapter"),
        ({"model": BASE, "prompt": "x", "suffix": "y"}, 400, "unsupported_parameter"),
        ({"model": BASE, "prompt": "x", "max_tokens": 1000}, 400, "invalid_request"),
        ({"model": BASE}, 400, "invalid_request"),
    ]
    for body, status, code in cases:
        r = post(app, "/v1/completions", body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["code"] == code and err["message"] and "Traceback" not in err["message"]
    assert "rank 16 exceeds" in post(app, "/v1/completions", cases[2][0]).json()["error"]["message"]
    assert post(app, "/v1/completions", {"model": "alpha", "prompt": "still here", "max_tokens": 3}).status_code == 200


def test_requests_follow_the_replica_that_holds_the_adapter(app):
    body = {"model": "gamma@v1", "prompt": "affinity", "max_tokens": 3, "temperature": 0}
    first = post(app, "/v1/completions", body).headers["x-openlora-replica"]
    wait_for(lambda: first in residency(app, "gamma@v1")["resident_on"])
    for _ in range(6):
        assert post(app, "/v1/completions", body).headers["x-openlora-replica"] == first


def test_replica_view_shows_each_replicas_free_memory_and_adapters(app):
    post(app, "/v1/completions", {"model": "gamma@v1", "prompt": "view", "max_tokens": 2})
    replicas = requests.get(f"{app}/v1/replicas", timeout=30).json()["data"]
    assert len(replicas) == 2
    assert sorted(d["total_kv_blocks"] for d in replicas) == [40, 120]
    assert sum("gamma@v1" in d["resident"] for d in replicas) >= 1
    assert all(d["num_slots"] == 2 and d["max_running"] == 4 for d in replicas)


def test_cold_adapters_land_on_the_replica_with_the_most_free_memory(app):
    empty_every_slot(app)
    replicas = requests.get(f"{app}/v1/replicas", timeout=30).json()["data"]
    roomiest = max(replicas, key=lambda d: d["free_kv_blocks"])["replica_id"]
    for name in ("zeta", "eta"):  # never requested before: no replica has them anywhere; 2 slots each
        where = residency(app, f"{name}@v1")
        assert not (where["resident_on"] or where["host_on"] or where["disk_on"])
        r = post(app, "/v1/completions", {"model": name, "prompt": "cold", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert r.headers["x-openlora-replica"] == roomiest


def test_concurrent_cold_requests_converge_on_one_replica(app):
    body = {"model": "epsilon@v1", "prompt": "cold start", "max_tokens": 4, "temperature": 0}
    assert not residency(app, "epsilon@v1")["resident_on"]
    # 3 < max_running (4): one replica takes them all without passing the router's spill load.
    with ThreadPoolExecutor(3) as pool:
        replicas = {r.headers["x-openlora-replica"] for r in pool.map(lambda _: post(app, "/v1/completions", body), range(3))}
    assert len(replicas) == 1
    wait_for(lambda: residency(app, "epsilon@v1")["resident_on"] == sorted(replicas))


def test_a_replica_whose_slots_all_serve_running_requests_is_passed_over_until_they_end(app):
    """Streams for iota and kappa pin both slots of the roomy replica: a request for a third,
    never-seen adapter goes to the other replica rather than wait there for a slot (the router
    counts its requests in flight); once the streams have ended (Serve reported them completed)
    and the slots are emptied, the next never-seen adapter lands on the roomy replica again."""
    empty_every_slot(app)
    replicas = requests.get(f"{app}/v1/replicas", timeout=30).json()["data"]
    roomiest = max(replicas, key=lambda d: d["free_kv_blocks"])["replica_id"]

    def start_stream(adapter: str) -> tuple[requests.Response, object]:
        body = {"model": adapter, "prompt": "hold", "max_tokens": 140, "temperature": 0, "stream": True}
        response = requests.post(f"{app}/v1/completions", json=body, stream=True, timeout=60)
        lines = response.iter_lines(decode_unicode=True)
        next(line for line in lines if line.startswith("data: "))  # decoding: its slot is pinned
        return response, lines

    held = [start_stream("iota"), start_stream("kappa")]
    try:
        assert [r.headers["x-openlora-replica"] for r, _ in held] == [roomiest, roomiest]
        r = post(app, "/v1/completions", {"model": "lambda", "prompt": "cold", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert r.headers["x-openlora-replica"] != roomiest
    finally:
        for response, lines in held:
            assert any(line == "data: [DONE]" for line in lines)  # read to the end
            response.close()
    # Serve reports completion from the ingress's handle just after the last chunk; with the slots
    # emptied, only the router's in-flight record of iota and kappa could still keep mu away.
    empty_every_slot(app)
    r = post(app, "/v1/completions", {"model": "mu", "prompt": "cold", "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.headers["x-openlora-replica"] == roomiest


def test_hot_adapter_spreads_to_a_second_replica_and_overload_is_503(app):
    body = {"model": "delta", "prompt": "hot " * 10, "max_tokens": 140, "temperature": 0}
    with ThreadPoolExecutor(24) as pool:
        codes = list(pool.map(lambda _: post(app, "/v1/completions", body), range(24)))
    ok = [r for r in codes if r.status_code == 200]
    refused = [r for r in codes if r.status_code != 200]
    assert len({r.headers["x-openlora-replica"] for r in ok}) == 2  # both replicas served delta
    assert all(r.status_code == 503 and r.headers.get("Retry-After") for r in refused)
    assert len(residency(app, "delta@v1")["resident_on"]) + len(residency(app, "delta@v1")["host_on"]) == 2


def test_adapter_management(app):
    info = requests.get(f"{app}/v1/adapters/beta", timeout=30).json()
    assert info["id"] == "beta@v1" and info["config"]["r"] == 8 and "adapter_model.safetensors" in info["files"]
    r = post(app, "/v1/adapters/beta/prefetch", {"replicas": 2})
    assert r.status_code == 200 and len(r.json()["replicas"]) == 2
    wait_for(lambda: len(residency(app, "beta@v1")["resident_on"]) == 2)
    r = post(app, "/v1/adapters/beta/evict", {})
    assert r.status_code == 200, r.text
    wait_for(lambda: not residency(app, "beta@v1")["resident_on"] and not residency(app, "beta@v1")["host_on"])
    r = post(app, "/v1/adapters/alpha/pin", {"replicas": 1})
    assert r.status_code == 200 and r.json()["pinned"]
    r = post(app, "/v1/adapters/alpha/evict", {})
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_in_use"
    assert post(app, "/v1/adapters/alpha/unpin", {}).status_code == 200
    assert post(app, "/v1/adapters/nope/prefetch", {}).status_code == 404


ACME_KEY, GLOBEX_KEY, ADMIN_KEY = "olr-acme-user", "olr-globex-user", "olr-acme-admin"


@pytest.fixture(scope="module")
def secure(app: str, tiny_chat_model_dir: Path, chat_store: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A second application with API keys and tight limits, on one CPU replica under /secure."""
    from ray import serve

    from openlora_ray.serve.app import build
    from openlora_ray.serve.auth import hash_key
    from openlora_ray.serve.config import AppConfig

    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(
        f"- {{tenant: acme, sha256: {hash_key(ACME_KEY)}}}\n"
        f"- {{tenant: globex, sha256: {hash_key(GLOBEX_KEY)}}}\n"
        f"- {{tenant: acme, sha256: {hash_key(ADMIN_KEY)}, admin: true}}\n"
    )
    cfg = AppConfig(
        model=str(tiny_chat_model_dir),
        served_model_name=BASE,
        engine={"num_slots": 2, "max_rank": 8, "max_running": 2, "max_seq_len": 96, "torch_threads": 1},
        store={"uri": str(chat_store), "cache_dir": str(tmp_path_factory.mktemp("secure-cache"))},
        replicas={"num_replicas": 1, "num_cpus": 0, "num_gpus": 0, "stats_period_s": 0.5, "graceful_shutdown_timeout_s": 1},
        ingress_num_cpus=0,
        auth={"keys_file": str(keys)},
        limits={"max_body_bytes": 4096, "requests_per_s": 1, "burst": 3, "max_tokens": 32},
    )
    serve.run(build(cfg), name="secure", route_prefix="/secure")
    return app + "/secure"


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_api_keys_tenants_and_scopes(secure):
    # acme's own adapter "acme.tone" and a shared one ("alpha", no owner prefix) are in the store.
    body = {"model": BASE, "prompt": "hi", "max_tokens": 2}
    assert requests.post(secure + "/v1/completions", json=body, timeout=30).status_code == 401
    r = requests.post(secure + "/v1/completions", json=body, headers=bearer("olr-wrong"), timeout=30)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer" and r.json()["error"]["code"] == "invalid_api_key"
    assert requests.post(secure + "/v1/completions", json=body, headers=bearer(ACME_KEY), timeout=30).status_code == 200
    assert requests.post(secure + "/v1/completions", json=dict(body, model="acme.tone"), headers=bearer(ACME_KEY), timeout=30).status_code == 200
    other = requests.post(secure + "/v1/completions", json=dict(body, model="acme.tone"), headers=bearer(GLOBEX_KEY), timeout=30)
    assert other.status_code == 404 and "acme.tone" in other.json()["error"]["message"]  # existence not revealed
    assert requests.post(secure + "/v1/completions", json=dict(body, model="alpha"), headers=bearer(GLOBEX_KEY), timeout=30).status_code == 200
    ids = {m["id"] for m in requests.get(secure + "/v1/models", headers=bearer(GLOBEX_KEY), timeout=30).json()["data"]}
    assert "alpha" in ids and "acme.tone" not in ids
    assert "acme.tone" in {m["id"] for m in requests.get(secure + "/v1/models", headers=bearer(ACME_KEY), timeout=30).json()["data"]}
    assert all(not a["id"].startswith("acme.") for a in requests.get(secure + "/v1/adapters", headers=bearer(GLOBEX_KEY), timeout=30).json()["data"])
    assert requests.get(secure + "/v1/adapters/acme.tone", headers=bearer(GLOBEX_KEY), timeout=30).status_code == 404
    assert requests.post(secure + "/v1/adapters/acme.tone/prefetch", json={}, headers=bearer(ACME_KEY), timeout=30).status_code == 403
    assert requests.post(secure + "/v1/adapters/acme.tone/prefetch", json={}, headers=bearer(ADMIN_KEY), timeout=30).status_code == 200
    assert requests.post(secure + "/v1/adapters/acme.tone/evict", json={}, headers=bearer(GLOBEX_KEY), timeout=30).status_code == 404


def test_limits_give_clear_4xx(secure):
    h = bearer(GLOBEX_KEY)
    big = requests.post(secure + "/v1/completions", json={"model": BASE, "prompt": "x" * 5000}, headers=h, timeout=30)
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large", big.text
    r = requests.post(secure + "/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 64}, headers=h, timeout=30)
    assert r.status_code == 400 and "limit of 32" in r.json()["error"]["message"]
    # max_tokens left out: the server's default, capped at its own limit, is no reason for a 400.
    r = requests.post(secure + "/v1/completions", json={"model": BASE, "prompt": "x"}, headers=bearer(ADMIN_KEY), timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 32, r.text
    codes = [requests.post(secure + "/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 1}, headers=h, timeout=30) for _ in range(6)]
    limited = [c for c in codes if c.status_code == 429]
    assert limited and all(int(c.headers["Retry-After"]) >= 1 and c.json()["error"]["code"] == "rate_limited" for c in limited)
