"""A hostile tenant and a careless operator against a real local cluster, over HTTP.

One application with API keys of two tenants and the operator, adapters in an S3 store (moto's
server over HTTP on loopback), and one without a store: every endpoint but the liveness probes
needs a key, the OpenAPI document included; a tenant's admin key manages only its tenant's
adapters; malformed input is a 4xx that says what is wrong; the Prometheus ``model`` label takes
only names that exist; error bodies never show the store's endpoint, bucket or the node's paths;
and re-pushing an adapter serves the new weights to new requests within ``latest_ttl_s`` while a
running request finishes on the old ones, checked token for token against PEFT.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import boto3
import pytest
import requests
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peft_helpers import save_peft_adapter
from serve_helpers import metrics_port, wait_for

pytestmark = pytest.mark.timeout(300)

BASE = "tiny"
ACME, ACME_ADMIN, GLOBEX_ADMIN, OPERATOR = "olr-acme", "olr-acme-admin", "olr-globex-admin", "olr-operator"
TTL_S = 1.0  # latest_ttl_s: how soon a re-pushed name is seen
PROMPT_IDS = [17, 284, 1073, 30, 902, 51, 7, 2024]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Deployment:
    def __init__(self, url: str, store, bucket: str, endpoint: str, server, model_dir: Path, work: Path, node_cache: Path) -> None:
        self.url, self.store, self.bucket, self.endpoint = url, store, bucket, endpoint
        self.server, self.model_dir, self.work, self.node_cache = server, model_dir, work, node_cache

    def post(self, path: str, body: dict, key: str = ACME, **kw) -> requests.Response:
        return requests.post(self.url + path, json=body, headers=bearer(key), timeout=60, **kw)


@pytest.fixture(scope="module")
def moto_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield server, f"http://{host}:{port}"
    with contextlib.suppress(Exception):  # the last test stops it on purpose
        server.stop()


@pytest.fixture(scope="module")
def dep(serve_url: str, moto_server, tiny_chat_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    from ray import serve

    from openlora_ray.serve.app import build
    from openlora_ray.serve.auth import hash_key
    from openlora_ray.serve.config import AppConfig
    from openlora_ray.store.settings import StoreSettings
    from openlora_ray.store.store import AdapterStore

    server, endpoint = moto_server
    bucket = f"hard-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=bucket)
    s3 = dict(uri=f"s3://{bucket}/adapters", endpoint_url=endpoint, region="us-east-1", addressing_style="path",
              access_key_id="testing", secret_access_key="testing", connect_timeout_s=1.0, read_timeout_s=2.0,
              max_attempts=1, latest_ttl_s=TTL_S)
    work = tmp_path_factory.mktemp("hardening")
    store = AdapterStore(StoreSettings(**s3, cache_dir=work / "push-cache"))
    for name, seed in (("alpha", 81), ("acme.tone", 82), ("globex.tone", 83)):
        store.push(save_peft_adapter(tiny_chat_model_dir, work / name, 4, 8.0, ("q_proj", "v_proj"), seed), f"{name}@v1")
    keys = work / "keys.yaml"
    keys.write_text("".join(
        f"- {{tenant: {tenant}, sha256: {hash_key(key)}, admin: {str(admin).lower()}}}\n"
        for key, tenant, admin in ((ACME, "acme", False), (ACME_ADMIN, "acme", True), (GLOBEX_ADMIN, "globex", True),
                                   (OPERATOR, "shared", True))
    ))
    node_cache = work / "node-cache"
    common = dict(
        model=str(tiny_chat_model_dir),
        served_model_name=BASE,
        engine={"num_slots": 2, "max_rank": 8, "max_running": 4, "max_seq_len": 160, "torch_threads": 1},
        replicas={"num_replicas": 1, "num_cpus": 0, "num_gpus": 0, "stats_period_s": 0.5, "graceful_shutdown_timeout_s": 1},
        ingress_num_cpus=0,
        auth={"keys_file": str(keys)},
        limits={"max_body_bytes": 8192, "max_tokens": 64, "requests_per_s": 1000, "burst": 1000, "max_streams": 64},
    )
    serve.run(build(AppConfig(**common, store={**s3, "cache_dir": str(node_cache)})), name="hardened", route_prefix="/")
    serve.run(build(AppConfig(**common)), name="bare", route_prefix="/bare")
    return Deployment(serve_url, store, bucket, endpoint, server, tiny_chat_model_dir, work, node_cache)


def routes(url: str) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves (its OpenAPI document, read with a key, and
    the document's own routes), path parameters filled in."""
    doc = requests.get(url + "/openapi.json", headers=bearer(ACME), timeout=30)
    assert doc.status_code == 200, doc.text
    out = [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc")]
    for path, methods in doc.json()["paths"].items():
        filled = path.replace("{model_id}", "alpha").replace("{adapter}", "alpha")
        out += [(m.upper(), filled) for m in methods]
    return out


def test_every_endpoint_but_the_health_probes_needs_a_key(dep):
    for prefix in ("", "/bare"):
        found = routes(dep.url + prefix)
        assert {"/v1/models", "/v1/completions", "/v1/adapters/alpha/pin", "/healthz"} <= {p for _, p in found}
        for method, path in found:
            r = requests.request(method, dep.url + prefix + path, json={}, timeout=30)
            if path in ("/healthz", "/health"):
                assert r.status_code == 200, (prefix, path)
            else:
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (prefix, method, path, r.text)
                assert r.headers["WWW-Authenticate"] == "Bearer"
        assert requests.get(dep.url + prefix + "/v1/models", headers=bearer("olr-nope"), timeout=30).status_code == 401
    bare = requests.get(dep.url + "/bare/v1/models", headers=bearer(ACME), timeout=30)
    assert bare.status_code == 200 and [m["id"] for m in bare.json()["data"]] == [BASE]
    doc = requests.get(dep.url + "/openapi.json", headers=bearer(ACME), timeout=30).json()
    assert "/v1/chat/completions" in doc["paths"] and not any(p.startswith(("/docs", "/redoc", "/openapi")) for p in doc["paths"])
    page = requests.get(dep.url + "/docs", headers=bearer(ACME), timeout=30)
    assert page.status_code == 200 and "/openapi.json" in page.text


def test_models_page_through_a_tenants_view(dep):
    def page(key: str, **params) -> dict:
        r = requests.get(dep.url + "/v1/models", params=params, headers=bearer(key), timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    assert [m["id"] for m in page(ACME)["data"]] == [BASE, "acme.tone", "alpha"]  # not globex.tone
    first = page(ACME, limit=1)
    assert [m["id"] for m in first["data"]] == [BASE, "acme.tone"] and first["has_more"] and first["last_id"] == "acme.tone"
    rest = page(ACME, limit=1, after=first["last_id"])
    assert [m["id"] for m in rest["data"]] == ["alpha"] and not rest["has_more"]
    assert [m["id"] for m in page(GLOBEX_ADMIN)["data"]] == [BASE, "alpha", "globex.tone"]
    versions = requests.get(dep.url + "/v1/adapters", params={"limit": 1}, headers=bearer(ACME), timeout=30).json()
    assert [v["id"] for v in versions["data"]] == ["acme.tone@v1"] and versions["has_more"] and versions["last_id"] == "acme.tone"
    for bad in ({"limit": 0}, {"limit": 5000}, {"after": "../x"}):
        r = requests.get(dep.url + "/v1/models", params=bad, headers=bearer(ACME), timeout=30)
        assert r.status_code == 400, (bad, r.text)


def test_an_admin_key_manages_only_its_own_tenants_adapters(dep):
    own = dep.post("/v1/adapters/acme.tone/pin", {"replicas": 1}, key=ACME_ADMIN)
    assert own.status_code == 200 and own.json()["pinned"], own.text
    assert dep.post("/v1/adapters/acme.tone/unpin", {}, key=ACME_ADMIN).status_code == 200
    assert dep.post("/v1/adapters/acme.tone/prefetch", {}, key=ACME).status_code == 403  # not an admin key
    for action in ("pin", "prefetch", "unpin", "evict"):
        shared = dep.post(f"/v1/adapters/alpha/{action}", {}, key=ACME_ADMIN)
        assert shared.status_code == 403, (action, shared.text)
        assert "only an admin key of tenant 'shared'" in shared.json()["error"]["message"]
        other = dep.post(f"/v1/adapters/acme.tone/{action}", {}, key=GLOBEX_ADMIN)
        assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"  # not even revealed
    assert dep.post("/v1/adapters/alpha/pin", {"replicas": 1}, key=OPERATOR).status_code == 200
    replicas = requests.get(dep.url + "/v1/replicas", headers=bearer(ACME_ADMIN), timeout=30).json()["data"]
    assert replicas[0]["pinned"] == ["alpha@v1"]  # the operator's pin of a shared adapter is visible
    assert dep.post("/v1/adapters/alpha/unpin", {}, key=OPERATOR).status_code == 200
    globex = requests.get(dep.url + "/v1/replicas", headers=bearer(GLOBEX_ADMIN), timeout=30).json()["data"]
    assert not any(a.startswith("acme.") for r in globex for k in ("resident", "host", "disk") for a in r[k])


def _raw_post(url: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict]:
    """A request with exactly these headers (``requests`` would fix a bad Content-Length)."""
    where = urlparse(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    try:
        conn.putrequest("POST", path, skip_accept_encoding=True)
        for k, v in {**bearer(ACME), "Content-Type": "application/json", **headers}.items():
            conn.putheader(k, v)
        conn.endheaders(body)
        response = conn.getresponse()
        data = response.read()
        try:
            return response.status, json.loads(data or b"{}")
        except ValueError:  # the HTTP server's own plain-text refusal of malformed framing
            return response.status, {"error": {"message": data.decode(errors="replace")}}
    finally:
        conn.close()


def test_malformed_input_is_a_4xx_that_says_what_is_wrong(dep):
    ok = {"model": BASE, "prompt": "x", "max_tokens": 2}
    cases = [
        (dict(ok, seed=2**64), "seed"),
        (dict(ok, seed=-(2**63) - 1), "seed"),
        (dict(ok, max_tokens=10**30), "max_tokens"),
        (dict(ok, temperature="hot"), "temperature"),
        (dict(ok, model=7), "model"),
        (dict(ok, prompt={"text": "x"}), "prompt"),
        (dict(ok, stop=[""]), "stop"),
        ({"model": BASE, "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"model": BASE, "messages": []}, "messages"),
    ]
    for body, field in cases:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        r = dep.post(path, body)
        assert 400 <= r.status_code < 500 and field in r.json()["error"]["message"], (body, r.status_code, r.text)
    seeded = dep.post("/v1/completions", dict(ok, seed=2**63 - 1, temperature=1.0))
    assert seeded.status_code == 200, seeded.text  # the largest seed the engine takes
    # Whether the HTTP server or the app's gate refuses it, a malformed Content-Length is a 400.
    for declared in ("lots", "1e3", "-1", "0x10", "\u0663".encode().decode("latin-1")):  # an Arabic-Indic 3
        status, body = _raw_post(dep.url, "/v1/completions", {"Content-Length": declared}, b"{}")
        assert status == 400 and body["error"]["message"], (declared, body)
    for raw in (b"{not json", b"[1, 2]", b'{"model": "tiny", "prompt": "x", "temperature": NaN}', b"\xff\xfe"):
        status, body = _raw_post(dep.url, "/v1/completions", {"Content-Length": str(len(raw))}, raw)
        assert 400 <= status < 500 and body["error"]["message"], (raw, status, body)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_fields = st.fixed_dictionaries(
    {"model": st.sampled_from([BASE, "alpha", "alpha@v1", "acme.tone", "globex.tone", "nope", "../x"]) | _json},
    optional={k: _json for k in ("prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                                  "n", "stream", "stream_options", "logprobs", "ignore_eos", "max_completion_tokens")}
    | {"prompt": st.text(max_size=30), "max_tokens": st.integers(-3, 70), "seed": st.integers(-(2**65), 2**65)},
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=_fields)
def test_fuzzed_json_bodies_never_get_a_500(dep, path, body):
    payload = json.dumps(body, allow_nan=True).encode()
    if len(payload) > 8000:
        return
    status, answer = _raw_post(dep.url, path, {"Content-Length": str(len(payload))}, payload) if not body.get("stream") else _stream_status(dep, path, payload)
    assert status < 500 or status == 503, (body, status, answer)
    if status >= 400:
        assert answer["error"]["message"], answer


def _stream_status(dep, path: str, payload: bytes) -> tuple[int, dict]:
    with requests.post(dep.url + path, data=payload, headers={**bearer(ACME), "Content-Type": "application/json"}, stream=True, timeout=60) as r:
        if r.status_code != 200:
            return r.status_code, r.json()
        events = [line for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        return 200, {}


def test_the_model_label_takes_only_names_that_exist(dep):
    junk = [f"junk-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    for model in junk:
        assert dep.post("/v1/completions", {"model": model, "prompt": "x", "max_tokens": 1}).status_code == 404
    assert dep.post("/v1/completions", {"model": "alpha@v1", "prompt": "x", "max_tokens": 1}).status_code == 200

    def scrape() -> str:
        text = requests.get(f"http://127.0.0.1:{metrics_port()}/metrics", timeout=10).text
        return text if 'model="unknown"' in text and 'model="alpha"' in text else ""

    text = wait_for(scrape, timeout=90, interval=2)
    assert not any(j in text for j in junk) and 'model="alpha@v1"' not in text


def _peft_text(model_dir: Path, adapter_dir: Path, max_tokens: int) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()
    eos = tokenizer.eos_token_id
    cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
    out = model.generate(torch.tensor([PROMPT_IDS]), attention_mask=torch.ones(1, len(PROMPT_IDS), dtype=torch.long), generation_config=cfg)
    new = out[0, len(PROMPT_IDS):].tolist()
    return tokenizer.decode(new[: new.index(eos)] if eos in new else new, skip_special_tokens=True)


def _complete(dep: Deployment, model: str, max_tokens: int) -> str:
    r = dep.post("/v1/completions", {"model": model, "prompt": PROMPT_IDS, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_a_re_pushed_adapter_serves_new_weights_to_new_requests_and_old_ones_to_running_requests(dep):
    name = "acme.bot"
    v1 = save_peft_adapter(dep.model_dir, dep.work / "bot-1", 4, 8.0, ("q_proj", "v_proj", "down_proj"), seed=91)
    v2 = save_peft_adapter(dep.model_dir, dep.work / "bot-2", 4, 8.0, ("q_proj", "v_proj", "down_proj"), seed=92)
    short, long = 8, 48
    ref1, ref2, ref1_long = _peft_text(dep.model_dir, v1, short), _peft_text(dep.model_dir, v2, short), _peft_text(dep.model_dir, v1, long)
    assert ref1 != ref2
    dep.store.push(v1, f"{name}@v1")
    assert _complete(dep, name, short) == ref1

    body = {"model": name, "prompt": PROMPT_IDS, "max_tokens": long, "temperature": 0, "stream": True}
    with requests.post(dep.url + "/v1/completions", json=body, headers=bearer(ACME), stream=True, timeout=60) as running:
        lines = running.iter_lines(decode_unicode=True)
        first = next(line for line in lines if line.startswith("data: "))  # decoding on v1
        dep.store.push(v2, f"{name}@v2")
        pushed = time.monotonic()
        wait_for(lambda: _complete(dep, name, short) == ref2, timeout=TTL_S + 10, interval=0.2)
        assert time.monotonic() - pushed < TTL_S + 5  # the ingress's memo of the newest version expired
        rest = [line for line in lines if line.startswith("data: ")]
    chunks = [json.loads(x[len("data: "):]) for x in [first, *rest] if x != "data: [DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == ref1_long  # finished on v1
    assert _complete(dep, f"{name}@v1", short) == ref1  # the old version serves while it exists
    assert _complete(dep, f"{name}@v2", short) == ref2 == _complete(dep, name, short)

    from openlora_ray.store.store import AdapterVersionExistsError

    dep.store.delete(f"{name}@v1")
    with pytest.raises(AdapterVersionExistsError, match="push this adapter as a new version"):
        dep.store.push(v2, f"{name}@v1")  # v1 can never mean other weights than the ones cached as v1


def test_error_bodies_name_no_endpoint_bucket_or_path(dep):
    """Last in the module: it stops the store."""
    from openlora_ray.store.manifest import build_manifest

    def assert_clean(r: requests.Response) -> dict:
        text = r.text
        for secret in (dep.endpoint, dep.bucket, str(dep.node_cache), "127.0.0.1", "/tmp"):
            assert secret not in text, (secret, text)
        return r.json()["error"]

    err = assert_clean(dep.post("/v1/completions", {"model": "missing", "prompt": "x", "max_tokens": 1}))
    assert err["code"] == "model_not_found" and "'missing'" in err["message"]
    # An adapter with NaN weights put in the bucket without `adapters push` (no checks).
    bad = dep.work / "nan"
    shutil.copytree(dep.work / "alpha", bad)
    from safetensors.torch import load_file, save_file

    tensors = load_file(bad / "adapter_model.safetensors")
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors", metadata={"format": "pt"})
    client = boto3.client("s3", endpoint_url=dep.endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        client.put_object(Bucket=dep.bucket, Key=f"adapters/nan/v1/{f}", Body=(bad / f).read_bytes())
    client.put_object(Bucket=dep.bucket, Key="adapters/nan/v1/openlora-manifest.json", Body=build_manifest("nan", "v1", bad).to_json())
    err = assert_clean(dep.post("/v1/completions", {"model": "nan@v1", "prompt": "x", "max_tokens": 1}))
    assert err["code"] == "invalid_adapter" and "NaN/Inf" in err["message"]
    dep.server.stop()
    for model in ("globex.unknown@v1", "alpha"):  # neither cached nor pinned before: needs the store
        r = dep.post("/v1/completions", {"model": model, "prompt": "x", "max_tokens": 1}, key=GLOBEX_ADMIN)
        if model == "alpha" and r.status_code == 200:
            continue  # alpha was pinned to its version before and is served from the replica's cache
        assert r.status_code == 503, r.text
        err = assert_clean(r)
        assert err["code"] == "store_unavailable" and "retry" in err["message"]



def test_the_in_flight_cap_counts_choices_not_http_requests(dep):
    """The key's cap is 64 choices (n x prompts): 65 alone are a 400 that names it (a 429 would
    be retried forever); 60 at a time, streamed or not, give all 60 back when they end (had
    the cap counted HTTP requests, or given back one, the next 60 would be refused)."""
    body = {"model": BASE, "prompt": "Count:", "max_tokens": 1, "temperature": 0}
    alone = dep.post("/v1/completions", {**body, "n": 65})
    assert alone.status_code == 400 and "at most 64" in alone.json()["error"]["message"], alone.text
    listed = dep.post("/v1/completions", {**body, "prompt": ["Count:", "Tell"] * 33})
    assert listed.status_code == 400, listed.text  # 66 prompts are 66 choices
    for stream in (False, True, False):
        r = dep.post("/v1/completions", {**body, "n": 60, "stream": stream})
        assert r.status_code == 200, r.text
        assert r.content  # read to the end: a stream gives its choices back when it ends
