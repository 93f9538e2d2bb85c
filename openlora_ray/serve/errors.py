"""Domain errors to HTTP: the only place status codes are decided."""

from __future__ import annotations

import math

from fastapi.responses import JSONResponse
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from openlora_ray.errors import (
    AdapterInUseError,
    AuthenticationError,
    PermissionDeniedError,
    RateLimitError,
    AdapterNotFoundError,
    CapacityError,
    InvalidAdapterError,
    InvalidAdapterIdError,
    InvalidRequestError,
    StoreUnavailableError,
)
from openlora_ray.serve.openai_api import error_body
from openlora_ray.store.store import AdapterVersionExistsError

RETRY_AFTER_S = 1

# (exception type, status, OpenAI error type, code, retry-after?) — first match wins.
_TABLE: list[tuple[type[BaseException], int, str, str, bool]] = [
    (AuthenticationError, 401, "authentication_error", "invalid_api_key", False),
    (PermissionDeniedError, 403, "permission_error", "forbidden", False),
    (RateLimitError, 429, "rate_limit_error", "rate_limited", True),
    (InvalidRequestError, 400, "invalid_request_error", "invalid_request", False),
    (InvalidAdapterIdError, 400, "invalid_request_error", "invalid_model_id", False),
    (AdapterNotFoundError, 404, "invalid_request_error", "model_not_found", False),
    (AdapterVersionExistsError, 409, "invalid_request_error", "version_exists", False),
    (AdapterInUseError, 409, "invalid_request_error", "adapter_in_use", False),
    (InvalidAdapterError, 422, "invalid_request_error", "invalid_adapter", False),
    (CapacityError, 429, "rate_limit_error", "overloaded", True),
    (BackPressureError, 503, "server_error", "overloaded", True),
    (StoreUnavailableError, 503, "server_error", "store_unavailable", True),
    ((ActorDiedError, ActorUnavailableError, RayActorError), 503, "server_error", "replica_unavailable", True),  # type: ignore[list-item]
]


def error_response(exc: BaseException) -> JSONResponse | None:
    """The HTTP answer for a known failure, or None for a bug (left to surface as a 500)."""
    while isinstance(exc, RayTaskError) and exc.cause is not None:  # raised in a replica
        exc = exc.cause
    for types, status, type_, code, retry in _TABLE:
        if isinstance(exc, types):
            # Serve's BackPressureError has ``retry_after_s`` too, and it is None unless configured.
            wait = max(RETRY_AFTER_S, math.ceil(getattr(exc, "retry_after_s", None) or 0))
            headers = {"Retry-After": str(wait)} if retry else {}
            if status == 401:
                headers["WWW-Authenticate"] = "Bearer"
            return JSONResponse(error_body(_message(exc), type_, code), status_code=status, headers=headers)
    return None


def _message(exc: BaseException) -> str:
    if isinstance(exc, RayActorError):
        return "the replica serving this request died; retry"
    return str(exc) or type(exc).__name__
