"""Per-key request limits: a token bucket for the request rate, a counter for open streams.

State lives in each ingress replica (limits are per ingress replica, so a deployment with k
ingress replicas admits up to k times the configured rate per key).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from openlora_ray.errors import RateLimitError


class LimitSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(1 << 20, ge=1024, description="request bodies larger than this get 413")
    max_tokens: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    max_stop: int = Field(8, ge=0, description="longest stop list")
    max_prompt_chars: int = Field(200_000, ge=1, description="longest prompt text (all messages), before tokenizing")
    requests_per_s: float = Field(20.0, gt=0, description="sustained request rate per key")
    burst: int = Field(40, ge=1, description="requests a key may send at once above the rate")
    max_streams: int = Field(32, ge=1, description="concurrent requests per key")


@dataclass
class TokenBucket:
    rate: float
    capacity: float
    tokens: float
    stamp: float

    def take(self, now: float) -> float:
        """0 if a request may go now (and count it), else the seconds until one may."""
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass
class KeyLimiter:
    settings: LimitSettings
    buckets: dict[str, TokenBucket] = field(default_factory=dict)
    streams: dict[str, int] = field(default_factory=dict)

    def admit(self, key_id: str, now: float | None = None) -> None:
        """Count a request start for ``key_id``, or raise RateLimitError with a retry hint."""
        now = time.monotonic() if now is None else now
        s = self.settings
        bucket = self.buckets.setdefault(key_id, TokenBucket(s.requests_per_s, s.burst, s.burst, now))
        if self.streams.get(key_id, 0) >= s.max_streams:
            raise RateLimitError(f"this key already has {s.max_streams} requests in flight; wait for one to finish", 1.0)
        wait = bucket.take(now)
        if wait:
            raise RateLimitError(f"rate limit of {s.requests_per_s:g} requests/s for this key exceeded", wait)
        self.streams[key_id] = self.streams.get(key_id, 0) + 1

    def done(self, key_id: str) -> None:
        self.streams[key_id] -= 1
