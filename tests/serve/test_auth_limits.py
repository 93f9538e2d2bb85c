"""API keys, tenant visibility and per-key limits as pure functions."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from openlora_ray.errors import AuthenticationError, RateLimitError
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
    with pytest.raises(RateLimitError, match="2 requests in flight"):
        limiter.admit("a", 0.0)
    limiter.admit("b", 0.0)  # other keys are not affected
    limiter.done("a")
    limiter.admit("a", 0.0)
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
