"""User-facing settings of the adapter store (a pydantic model: validated once, at startup).

Anything not set here falls back to the standard AWS configuration chain (``AWS_ACCESS_KEY_ID`` and
friends, ``AWS_PROFILE``, ``~/.aws/config``, ``AWS_ENDPOINT_URL_S3``, instance roles), so the same
settings work on a laptop against MinIO and on EC2 against S3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

GiB = 1 << 30
DEFAULT_CACHE_DIR = Path("~/.cache/openlora-ray/adapters")


class StoreSettings(BaseModel):
    """Where adapters live, how to reach the store, and how much local disk the cache may use."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str = Field(description="store root: s3://bucket/prefix, file:///path or a folder path")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://minio:9000")
    region: str | None = Field(None, description="AWS region; None uses the AWS config chain")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="'path' for MinIO and most self-hosted S3 servers"
    )
    profile: str | None = Field(None, description="AWS profile name from ~/.aws/config")
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    connect_timeout_s: float = Field(3.0, gt=0)
    read_timeout_s: float = Field(20.0, gt=0)
    max_attempts: int = Field(3, ge=1, le=20, description="total tries per request, with backoff")
    cache_dir: Path = DEFAULT_CACHE_DIR
    cache_bytes: int = Field(20 * GiB, gt=0, description="disk budget of the node-local cache")
    max_adapter_bytes: int = Field(2 * GiB, gt=0, description="refuse larger adapters before download")
    latest_ttl_s: float = Field(
        5.0, ge=0, description="how long 'name' (newest version) resolves without asking the store again"
    )
    evict_grace_s: float = Field(
        30.0, ge=0, description="entries used this recently are never evicted (a loader may be reading them)"
    )
    check_finite: bool = Field(True, description="scan weights for NaN/Inf once, when downloaded")

    @model_validator(mode="after")
    def _adapter_fits_cache(self) -> "StoreSettings":
        if self.max_adapter_bytes > self.cache_bytes:
            raise ValueError(
                f"max_adapter_bytes ({self.max_adapter_bytes}) exceeds cache_bytes ({self.cache_bytes}): "
                "an accepted adapter must fit in the cache"
            )
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("set both access_key_id and secret_access_key, or neither")
        return self

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir).expanduser().resolve()
