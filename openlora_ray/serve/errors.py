"""Domain errors to HTTP: the only place status codes are decided, and what a client is told.

A client is told what it can act on, never where the server keeps things: the store's endpoint,
bucket and folders and the node's cache paths appear in domain errors (they are what an operator
needs) and are logged here, but the body says "the adapter store is unavailable" or names the
adapter and the reason only.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError
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
from openlora_ray.serve.openai_responses import error_body
from openlora_ray.store.store import AdapterVersionExistsError

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
STORE_UNAVAILABLE = "the adapter store did not answer; adapters already cached keep working, retry this one later"
# URLs (s3://bucket/prefix, http://endpoint) and absolute paths with at least two components.
_LOCATION = re.compile(r"""[a-z][a-z0-9+.-]*://[^\s'"]+|(?<![\w.])/(?:[^\s'"/]+/)+[^\s'",;)]*""", re.IGNORECASE)

# (exception type, status, OpenAI error type, code, retry-after?) — first match wins.
_TABLE: list[tuple[type[BaseException], int, str, str, bool]] = [
    (AuthenticationError, 401, "authentication_error", "invalid_api_key", False),
    (PermissionDeniedError, 403, "permission_error", "forbidden", False),
    (RateLimitError, 429, "rate_limit_error", "rate_limited", True),
    (InvalidRequestError, 400, "invalid_request_error", "invalid_request", False),
    (ValidationError, 400, "invalid_request_error", "invalid_request", False),  # a value the engine's types refuse
    (InvalidAdapterIdError, 400, "invalid_request_error", "invalid_model_id", False),
    (AdapterNotFoundError, 404, "invalid_request_error", "model_not_found", False),
    (AdapterVersionExistsError, 409, "invalid_request_error", "version_exists", False),
    (AdapterInUseError, 409, "invalid_request_error", "adapter_in_use", False),
    # 400, not 422: the SDKs raise UnprocessableEntityError for a 422, which code written for other
    # OpenAI servers (``except BadRequestError``) does not catch; the code says what went wrong.
    (InvalidAdapterError, 400, "invalid_request_error", "invalid_adapter", False),
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


def refusal(message: str, code: str, status: int) -> JSONResponse:
    """A 4xx for a request refused before any endpoint saw it (see :mod:`gate`)."""
    return JSONResponse(error_body(message, "invalid_request_error", code), status_code=status)


def _message(exc: BaseException) -> str:
    """What the client is told (see the module docstring); the full message goes to the log."""
    if isinstance(exc, RayActorError):
        return "the replica serving this request died; retry"
    if isinstance(exc, StoreUnavailableError):
        log.warning("answering 503: %s", exc)
        return STORE_UNAVAILABLE
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return f"{where}: {first['msg']}" if where else first["msg"]
    if isinstance(exc, AdapterNotFoundError) and "/" in exc.where:
        return f"adapter {exc.adapter_id!r} not found"
    message = str(exc) or type(exc).__name__
    redacted = redact(message)
    if redacted != message:
        log.info("told the client %r for: %s", redacted, message)
    return redacted


def redact(message: str) -> str:
    """``message`` without URLs and absolute paths (a backstop: errors should not carry them)."""
    return _LOCATION.sub("<server path>", message)


def stream_error(exc: BaseException) -> dict[str, Any]:
    """The ``error`` object of the event that ends a stream which already answered 200."""
    response = error_response(exc)
    if response is not None:
        return json.loads(response.body)["error"]
    log.error("stream failed with an unexpected error", exc_info=exc)
    return {"message": "internal error; the request was not completed", "type": "server_error", "code": "internal_error"}
