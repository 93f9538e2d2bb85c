"""API keys, tenants and who may use which adapter (pure policy, no HTTP).

Keys are bearer tokens; only their sha256 is configured (a keys file, e.g. a mounted Kubernetes
Secret, or inline), so a leaked config does not leak keys. Each key belongs to a tenant and may
carry the admin scope. An adapter belongs to the tenant named before the first ``.`` of its name
(``acme.support-bot`` is acme's); a name without a dot, or owned by ``shared_owner``, is shared
with every tenant. Another tenant's adapter is reported as *not found*, so its existence is not
revealed.

Managing an adapter (prefetch, pin, unpin, evict) takes slots and memory from everyone on the
replicas, so an admin key manages its *own* tenant's adapters only: a tenant admin that pinned
every shared adapter could leave no slot for other tenants' requests. Shared adapters are managed
by admin keys of the ``shared_owner`` tenant (the operator's).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from openlora_ray.errors import AuthenticationError, PermissionDeniedError

KEY_PREFIX = "olr-"


class ApiKeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 hex of the key; never the key itself")
    admin: bool = Field(False, description="may push, delete, prefetch, pin and evict adapters of its tenant")
    name: str | None = Field(None, description="a label for operators")


class AuthSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="off only for a local demo: then anyone may do anything")
    keys_file: Path | None = Field(None, description="YAML list of ApiKeyEntry (e.g. a mounted Secret)")
    keys: tuple[ApiKeyEntry, ...] = ()
    shared_owner: str = Field("shared", description="adapters named '<shared_owner>.x' are everyone's")

    @model_validator(mode="after")
    def _has_keys_when_enabled(self) -> "AuthSettings":
        if self.enabled and self.keys_file is None and not self.keys:
            raise ValueError("auth is enabled but no keys are configured: set keys_file or keys (or enabled: false for a local demo)")
        return self


@dataclass(frozen=True)
class Principal:
    tenant: str | None  # None = auth disabled: every adapter is visible
    admin: bool
    key_id: str  # stable id for per-key limits (a prefix of the key's hash)

    def may_use(self, adapter_name: str, shared_owner: str) -> bool:
        if self.tenant is None:
            return True
        return owner_of(adapter_name, shared_owner) in (self.tenant, shared_owner)

    def owners(self, shared_owner: str) -> frozenset[str] | None:
        """The name prefixes this key sees besides undotted names (None: every adapter)."""
        return None if self.tenant is None else frozenset({self.tenant, shared_owner})

    def check_may_manage(self, adapter_name: str, shared_owner: str) -> None:
        """Raise PermissionDeniedError unless this key may prefetch, pin, unpin or evict the adapter.

        Call after :meth:`may_use` said yes (so another tenant's adapter still reads as not found).
        """
        if not self.admin:
            raise PermissionDeniedError("managing adapters needs an admin key")
        owner = owner_of(adapter_name, shared_owner)
        if self.tenant is not None and owner != self.tenant:
            raise PermissionDeniedError(
                f"adapter {adapter_name!r} is shared: only an admin key of tenant {shared_owner!r} may prefetch, "
                f"pin, unpin or evict it (this key's tenant is {self.tenant!r})"
            )


def owner_of(adapter_name: str, shared_owner: str) -> str:
    """The tenant an adapter belongs to: the part of its name before the first '.', else shared."""
    name = adapter_name.split("@", 1)[0]
    return name.split(".", 1)[0] if "." in name else shared_owner


ANONYMOUS = Principal(tenant=None, admin=True, key_id="anonymous")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class KeyRing:
    """Turns an ``Authorization: Bearer <key>`` header into a Principal."""

    def __init__(self, settings: AuthSettings) -> None:
        self.enabled = settings.enabled
        entries = list(settings.keys)
        if settings.keys_file is not None:
            raw = yaml.safe_load(Path(settings.keys_file).expanduser().read_text()) or []
            entries += TypeAdapter(list[ApiKeyEntry]).validate_python(raw)
        self._by_hash = {e.sha256: Principal(e.tenant, e.admin, e.sha256[:16]) for e in entries}

    def authenticate(self, authorization: str | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise AuthenticationError("missing API key: send 'Authorization: Bearer <key>'")
        principal = self._by_hash.get(hash_key(key.strip()))
        if principal is None:
            raise AuthenticationError("invalid API key")
        return principal
