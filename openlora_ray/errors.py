"""Domain exceptions shared by every layer.

Each layer raises one of these; only the HTTP ingress maps them to status codes, so the engine,
the store and the model core stay usable (and testable) without a web framework.
"""

from __future__ import annotations


class OpenLoraError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidAdapterError(OpenLoraError):
    """An adapter exists but cannot be served (bad config, shapes, weights or format). HTTP 400."""

    def __init__(self, adapter_id: str, reason: str) -> None:
        super().__init__(f"adapter {adapter_id!r} cannot be served: {reason}")
        self.adapter_id = adapter_id
        self.reason = reason

    def __reduce__(self):  # picklable across processes (Ray re-raises it in the caller)
        return type(self), (self.adapter_id, self.reason)


class InvalidAdapterIdError(OpenLoraError):
    """An adapter id that is not well formed (never turned into a path or key). HTTP 400."""


class AdapterNotFoundError(OpenLoraError):
    """No adapter (or no such version) under the store root. HTTP 404."""

    def __init__(self, adapter_id: str, where: str = "") -> None:
        suffix = f" in {where}" if where else ""
        super().__init__(f"adapter {adapter_id!r} not found{suffix}")
        self.adapter_id = adapter_id
        self.where = where

    def __reduce__(self):
        return type(self), (self.adapter_id, self.where)


class StoreUnavailableError(OpenLoraError):
    """The object store did not answer in time or refused the connection. HTTP 503."""


class CapacityError(OpenLoraError):
    """No room right now (every slot pinned, queue full); retrying later can succeed. HTTP 429/503."""


class InvalidRequestError(OpenLoraError):
    """A request the server will never be able to serve as sent (too long, bad prompt). HTTP 400."""


class AdapterInUseError(OpenLoraError):
    """An operation that needs an idle adapter (evict, delete) while requests or a pin use it. HTTP 409."""


class AuthenticationError(OpenLoraError):
    """No API key, or one that is not known. HTTP 401."""


class PermissionDeniedError(OpenLoraError):
    """A known key without the scope an operation needs (e.g. admin for management). HTTP 403."""


class RateLimitError(CapacityError):
    """A key went past its request rate or concurrent-stream limit. HTTP 429 with Retry-After."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return type(self), (str(self), self.retry_after_s)
