"""Per-key request limits: a token bucket for the request rate, a counter for requests in flight.

The in-flight counter counts engine requests, not HTTP requests: one completions request with
``n: 8`` over a list of 4 prompts runs 32 sequences on the replicas, the load the cap is there to
bound, so it counts 32. A request that alone exceeds the cap could never be admitted: it is a 400
naming the limit, not a 429 to retry forever. The rate counts HTTP requests, as OpenAI's do.

State lives in each ingress replica (limits are per ingress replica, so a deployment with k
ingress replicas admits up to k times the configured rate per key).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

from openlora_ray.errors import InvalidRequestError, RateLimitError


class LimitSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(1 << 20, ge=1024, description="request bodies larger than this get 413")
    max_tokens: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    max_stop: int = Field(8, ge=0, description="longest stop list")
    max_prompt_chars: int = Field(200_000, ge=1, description="longest prompt text (all messages), before tokenizing")
    requests_per_s: float = Field(20.0, gt=0, description="sustained request rate per key")
    burst: int = Field(40, ge=1, description="requests a key may send at once above the rate")
    max_streams: int = Field(32, ge=1, description="engine requests (choices: n x prompts) in flight per key")


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

    def admit(self, key_id: str, now: float | None = None, choices: int = 1) -> None:
        """Count a request of ``choices`` engine requests for ``key_id``, or raise RateLimitError
        with a retry hint (InvalidRequestError if it exceeds the cap on its own)."""
        now = time.monotonic() if now is None else now
        s = self.settings
        if choices > s.max_streams:
            raise InvalidRequestError(
                f"this request runs {choices} choices (n x prompts) and a key may have at most {s.max_streams} "
                "in flight; split it or lower n"
            )
        bucket = self.buckets.setdefault(key_id, TokenBucket(s.requests_per_s, s.burst, s.burst, now))
        busy = self.streams.get(key_id, 0)
        if busy + choices > s.max_streams:
            raise RateLimitError(
                f"this key has {busy} of its {s.max_streams} choices in flight and this request needs {choices}; "
                "wait for some to finish",
                1.0,
            )
        wait = bucket.take(now)
        if wait:
            raise RateLimitError(f"rate limit of {s.requests_per_s:g} requests/s for this key exceeded", wait)
        self.streams[key_id] = busy + choices

    def done(self, key_id: str, choices: int = 1) -> None:
        self.streams[key_id] -= choices
