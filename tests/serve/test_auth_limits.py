"""API keys, tenant visibility and per-key limits as pure functions."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from openlora_ray.errors import AuthenticationError, InvalidRequestError, RateLimitError
from openlora_ray.serve.auth import AuthSettings, KeyRing, hash_key, new_key
from openlora_ray.serve.limits import KeyLimiter, LimitSettings, TokenBucket


def test_keys_are_checked_by_hash_and_map_to_tenants(tmp_path):
    admin_key, user_key = new_key(), new_key()
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"- {{tenant: acme, sha256: {hash_key(admin_key)}, admin: true}}\n")
    ring = KeyRing(AuthSettings(keys_file=keys, keys=[{"tenant": "globex", "sha256": hash_key(user_key)}]))
    assert ring.authenticate(f"Bearer {admin_key}").tenant == "acme" and ring.authenticate(f"Bearer {admin_key}").admin
    user = ring.authenticate(f"bearer {user_key}")
    assert user.tenant == "globex" and not user.admin
    for header in (None, "", "Bearer ", f"Basic {user_key}", "Bearer olr-not-a-key"):
        with pytest.raises(AuthenticationError):
            ring.authenticate(header)
    assert user_key not in keys.read_text() and admin_key not in keys.read_text()


def test_tenants_see_their_own_and_shared_adapters_only():
    ring = KeyRing(AuthSettings(keys=[{"tenant": "acme", "sha256": hash_key("k")}]))
    acme = ring.authenticate("Bearer k")
    assert acme.may_use("acme.bot", "shared") and acme.may_use("shared.faq", "shared") and acme.may_use("plain", "shared")
    assert not acme.may_use("globex.bot", "shared") and not acme.may_use("acmex.bot", "shared")
    anyone = KeyRing(AuthSettings(enabled=False)).authenticate(None)
    assert anyone.may_use("globex.bot", "shared") and anyone.admin


def test_auth_enabled_without_keys_is_a_config_error():
    with pytest.raises(ValidationError, match="no keys are configured"):
        AuthSettings()
    with pytest.raises(ValidationError):
        AuthSettings(keys=[{"tenant": "Bad Tenant!", "sha256": hash_key("k")}])


def test_token_bucket_refills_at_its_rate():
    bucket = TokenBucket(rate=2.0, capacity=2, tokens=2, stamp=0.0)
    assert bucket.take(0.0) == 0 and bucket.take(0.0) == 0
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.5) == 0  # one token came back after 0.5 s
    assert bucket.take(0.5) == pytest.approx(0.5)


def test_key_limiter_counts_streams_per_key():
    limiter = KeyLimiter(LimitSettings(requests_per_s=100, burst=100, max_streams=2))
    limiter.admit("a", 0.0)
    limiter.admit("a", 0.0)
    with pytest.raises(RateLimitError, match="2 of its 2 choices in flight"):
        limiter.admit("a", 0.0)
    limiter.admit("b", 0.0)  # other keys are not affected
    limiter.done("a")
    limiter.admit("a", 0.0)


def test_key_limiter_counts_choices_not_http_requests():
    """n x prompts engine requests count as that many; one that alone exceeds the cap is a 400."""
    limiter = KeyLimiter(LimitSettings(requests_per_s=100, burst=100, max_streams=8))
    limiter.admit("a", 0.0, choices=6)
    with pytest.raises(RateLimitError, match="has 6 of its 8 choices in flight and this request needs 3"):
        limiter.admit("a", 0.0, choices=3)
    limiter.admit("a", 0.0, choices=2)
    limiter.done("a", 6)
    limiter.admit("a", 0.0, choices=6)
    with pytest.raises(InvalidRequestError, match="runs 9 choices"):
        limiter.admit("b", 0.0, choices=9)
    assert limiter.streams == {"a": 8}  # a refused request counts nothing
    slow = KeyLimiter(LimitSettings(requests_per_s=1, burst=1))
    slow.admit("k", 0.0)
    slow.done("k")
    with pytest.raises(RateLimitError) as err:
        slow.admit("k", 0.25)
    assert err.value.retry_after_s == pytest.approx(0.75)


def test_keys_new_cli_prints_a_key_and_its_hash(capsys):
    import yaml

    from openlora_ray.cli import main

    assert main(["keys", "new", "--tenant", "acme", "--admin"]) == 0
    out = capsys.readouterr().out
    key = out.split("stored anywhere): ")[1].split()[0]
    entry = yaml.safe_load(out.split("keys file entry:\n")[1])[0]
    assert entry == {"tenant": "acme", "sha256": hash_key(key), "admin": True}
    assert KeyRing(AuthSettings(keys=[entry])).authenticate(f"Bearer {key}").admin


def test_an_admin_key_manages_its_own_tenants_adapters_only():
    from openlora_ray.errors import PermissionDeniedError

    ring = KeyRing(AuthSettings(keys=[
        {"tenant": "acme", "sha256": hash_key("a"), "admin": True},
        {"tenant": "acme", "sha256": hash_key("u")},
        {"tenant": "shared", "sha256": hash_key("op"), "admin": True},
    ]))
    admin, user, operator = (ring.authenticate(f"Bearer {k}") for k in ("a", "u", "op"))
    admin.check_may_manage("acme.bot", "shared")
    admin.check_may_manage("acme.bot@v3", "shared")
    for shared in ("alpha", "shared.faq", "alpha@v1"):
        with pytest.raises(PermissionDeniedError, match="only an admin key of tenant 'shared'"):
            admin.check_may_manage(shared, "shared")
        operator.check_may_manage(shared, "shared")
    with pytest.raises(PermissionDeniedError, match="needs an admin key"):
        user.check_may_manage("acme.bot", "shared")
    KeyRing(AuthSettings(enabled=False)).authenticate(None).check_may_manage("globex.bot", "shared")


def test_model_label_values_are_bounded_by_what_resolved():
    from openlora_ray.serve.labels import Labelled, ModelLabels

    seen = []

    class Metric:
        def inc(self, value=1.0, tags=None):
            seen.append(tags["model"])

    labels = ModelLabels("base")
    counter = Labelled(Metric(), labels)
    for model in ("base", "alpha@v1", "x" * 10_000, None, "alpha"):
        counter.inc(tags={"model": model, "status": "ok"})
    labels.admit("alpha@v1")
    counter.inc(tags={"model": "alpha@v2"})
    assert seen == ["base", "unknown", "unknown", "unknown", "unknown", "alpha"]


def test_client_messages_carry_no_store_location():
    import json

    from openlora_ray.errors import AdapterNotFoundError, InvalidAdapterError, StoreUnavailableError
    from openlora_ray.serve.errors import error_response, stream_error

    where = "s3://secret-bucket/adapters at http://10.1.2.3:9000"
    cases = [
        (StoreUnavailableError(f"cannot reach {where} to read 'a/v1/openlora-manifest.json'"), 503, "store_unavailable"),
        (AdapterNotFoundError("a@v1", where), 404, "model_not_found"),
        (InvalidAdapterError("a@v1", "cached copy at /var/cache/openlora/x/a/v1 was damaged"), None, "invalid_adapter"),
    ]
    for exc, status, code in cases:
        response = error_response(exc)
        body = json.loads(response.body)["error"]
        assert response.status_code == (status or response.status_code) and body["code"] == code
        assert "secret-bucket" not in body["message"] and "10.1.2.3" not in body["message"] and "/var/cache" not in body["message"]
        assert "a@v1" in body["message"] or code == "store_unavailable"
    assert stream_error(RuntimeError("boom at /srv/secret")) == {
        "message": "internal error; the request was not completed", "type": "server_error", "code": "internal_error"}
